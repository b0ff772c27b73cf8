/** The article's walkthrough (steps 10–13), over the real processes: order-service → ambassador →
 * inventory-service, with inventory taken down, brought back, and made flaky. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AmbassadorProc,
  ARTIFACTS,
  deadPort,
  type ServiceProc,
  startAmbassador,
  startService,
} from './helpers.ts';

const EXPECTED = 'Order received. Inventory says: {"item":"widget","stock":42}';

describe.each(ARTIFACTS)("the article's walkthrough (%s)", (runtime) => {
  let inventoryPort: number;
  let inventory: ServiceProc | undefined;
  let amb: AmbassadorProc;
  let order: ServiceProc;

  beforeAll(async () => {
    inventoryPort = await deadPort();
    inventory = await startService(runtime, 'inventory-service', { PORT: String(inventoryPort) });
    amb = await startAmbassador(runtime, { UPSTREAM_URL: `http://127.0.0.1:${inventoryPort}`, RETRY_BACKOFF_MS: '50' });
    order = await startService(runtime, 'order-service', { AMBASSADOR_URL: amb.url });
  });
  afterAll(async () => {
    await Promise.all([order?.stop(), amb?.stop(), inventory?.stop()]);
  });

  it('1. the full chain answers the order', async () => {
    const res = await fetch(`${order.url}/order`);
    expect(res.status).toBe(200);
    expect(await res.text()).toBe(EXPECTED);
  });

  it('2. each layer answers on its own: the ambassador and the inventory directly', async () => {
    expect(await (await fetch(`${amb.url}/inventory`)).json()).toEqual({ item: 'widget', stock: 42 });
    expect(await (await fetch(`http://127.0.0.1:${inventoryPort}/inventory`)).json()).toEqual({
      item: 'widget',
      stock: 42,
    });
  });

  it('3. inventory scaled to 0: one log line per failed attempt, a prompt 502 that says why', async () => {
    inventory!.kill('SIGTERM');
    await inventory!.exited;
    inventory = undefined;
    await amb.settled();
    const before = amb.logs().length;
    const t0 = performance.now();
    const res = await fetch(`${order.url}/order`);
    const took = performance.now() - t0;
    expect(res.status).toBe(502);
    expect(await res.text()).toMatch(/^upstream error: 502 ambassador: upstream failed: .*refused.*\(3 attempts\)/i);
    expect(took).toBeLessThan(3000);
    // Out by now on Node and Bun, whose writes to a pipe with room are done at once; Deno's are asynchronous.
    await amb.waitForLine((l) => /"msg":"attempt 3 failed: .*refused/i.test(l), 2000);
    const attempts = amb.logs().slice(before).filter((l) => /^attempt \d failed: .*refused/i.test(String(l.msg)));
    expect(attempts.map((l) => l.attempt)).toEqual([1, 2, 3]);
  });

  it('4. inventory back: the chain works again without restarting anything else', async () => {
    inventory = await startService(runtime, 'inventory-service', { PORT: String(inventoryPort) });
    const res = await fetch(`${order.url}/order`);
    expect(await res.text()).toBe(EXPECTED);
  });

  it('5. a flaky inventory (every other request 503): every order succeeds, and the logs show the retries', async () => {
    inventory!.kill('SIGTERM');
    await inventory!.exited;
    inventory = await startService(runtime, 'inventory-service', { PORT: String(inventoryPort), FAIL_EVERY: '2' });
    await amb.settled();
    const before = amb.logs().length;
    for (let i = 0; i < 10; i++) {
      const res = await fetch(`${order.url}/order`);
      expect(await res.text()).toBe(EXPECTED);
    }
    await amb.settled();
    const retries = amb.logs().slice(before).filter((l) =>
      /^attempt 1 failed: upstream answered 503; retrying/.test(String(l.msg))
    );
    expect(retries.length).toBeGreaterThanOrEqual(4);
    expect(inventory.lines.filter((l) => l.includes('failing on purpose')).length).toBe(retries.length);
  });

  it("6. the README's `?fail_every=2` line shows a retry the first time, whatever came before it", async () => {
    inventory!.kill('SIGTERM');
    await inventory!.exited;
    inventory = await startService(runtime, 'inventory-service', { PORT: String(inventoryPort) });
    for (let i = 0; i < 3; i++) expect((await fetch(`${amb.url}/inventory`)).status).toBe(200); // the walk-through's earlier calls
    await amb.settled();
    const before = amb.logs().length;
    const res = await fetch(`${amb.url}/inventory?fail_every=2`);
    expect(res.status).toBe(200);
    await amb.settled();
    const retries = amb.logs().slice(before).filter((l) =>
      /^attempt 1 failed: upstream answered 503; retrying/.test(String(l.msg))
    );
    expect(retries).toHaveLength(1);
  });
});
