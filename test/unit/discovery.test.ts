/** Service discovery: a name that resolves to several addresses is several endpoints, looked up again as
 * the TTL or DNS_REFRESH_MS says. The resolver here is one the test controls (injected into an in-process
 * ambassador), the upstreams real servers on loopback addresses sharing one port, like the pods behind a
 * headless Service (each artifact's own resolver: test/discovery.test.ts). */
import dns from 'node:dns';
import { describe, expect, it } from 'vitest';
import { createAmbassador, loadConfig, nodeResolve, nodeRuntime, type Resolve } from '../../ambassador.ts';
import { onStop, startUpstream, stopAfterEach, type Upstream } from '../helpers.ts';

/** An in-process ambassador on Node's own server and client, with the test's resolver and a clock the
 * test can move forward. */
async function ambassadorWith(resolve: Resolve, env: Record<string, string>) {
  const clock = {
    offset: 0,
    now: () => performance.timeOrigin + performance.now() + clock.offset,
    random: Math.random,
  };
  const lines: Array<Record<string, unknown>> = [];
  const runtime = await nodeRuntime();
  const amb = createAmbassador(loadConfig({ LOG_LEVEL: 'debug', ...env }), { ...runtime, resolve }, {
    clock,
    log: (level, msg, fields) => lines.push({ level, msg, ...fields }),
  });
  const listener = await runtime.listen(amb.proxy.fetch, '127.0.0.1', 0, {
    uploadsRead: amb.uploadsRead,
    inFlight: () => amb.inFlight.size,
    failed: (error) => lines.push({ level: 'error', msg: `unexpected error: ${error}` }),
    warn: (message) => lines.push({ level: 'warn', msg: message }),
  });
  onStop(async () => {
    listener.cutOff();
    await listener.close();
  });
  const url = `http://127.0.0.1:${listener.port}`;
  return {
    amb,
    clock,
    lines,
    get: (path = '/x') => fetch(`${url}${path}`).then(async (r) => ({ status: r.status, text: await r.text() })),
  };
}

/** Real upstreams on 127.0.0.2, .3 and .4, all on one port, each answering with its address. */
async function pods(): Promise<Upstream[]> {
  const first = await startUpstream((q, res) => res.end(q.socket.localAddress), { host: '127.0.0.2' });
  const rest = await Promise.all(
    ['127.0.0.3', '127.0.0.4'].map((host) =>
      startUpstream((q, res) => res.end(q.socket.localAddress), { host, port: first.port })
    ),
  );
  return [first, ...rest];
}

describe('discovery with a resolver the test controls', () => {
  stopAfterEach();

  it('spreads over every address of the name, and takes up addresses that appear and disappear without a restart', async () => {
    const [a, b, c] = await pods();
    let answer = ['127.0.0.2'];
    let lookups = 0;
    const names: string[] = [];
    const { clock, lines, get } = await ambassadorWith(async (name) => {
      // Recorded, and asserted outside: an expect thrown in here would be taken for a failed lookup.
      names.push(name);
      lookups++;
      return { addresses: answer };
    }, { UPSTREAM_URL: `http://inventory.test:${a.port}`, DNS_REFRESH_MS: '5000' });

    for (let i = 0; i < 10; i++) expect(await get()).toEqual({ status: 200, text: '127.0.0.2' });
    expect(lookups).toBe(1); // looked up once, not per request
    expect(names).toEqual(['inventory.test']);
    // The upstream sees its own name in Host, wherever the connection went.
    expect(a.seen[0].headers.host).toBe(`inventory.test:${a.port}`);

    answer = ['127.0.0.2', '127.0.0.3', '127.0.0.4'];
    clock.offset += 5001;
    await get(); // this request starts the lookup; the ones after it use the answer
    const served = new Set<string>();
    // Power of two choices over the latency average: the first address, slower on average than the two
    // new ones until they have answered a few, is picked less often; 4 × 40 requests reach it every time.
    await Promise.all(Array.from({ length: 4 }, async () => {
      for (let i = 0; i < 40; i++) served.add((await get()).text);
    }));
    expect(served).toEqual(new Set(['127.0.0.2', '127.0.0.3', '127.0.0.4']));
    expect(lines.filter((l) => l.msg === 'endpoints changed').map((l) => [l.added, l.removed])).toEqual([
      [[`127.0.0.2:${a.port}`], []],
      [[`127.0.0.3:${a.port}`, `127.0.0.4:${a.port}`], []],
    ]);

    answer = ['127.0.0.4'];
    clock.offset += 5001;
    await get();
    const before = [a.seen.length, b.seen.length];
    for (let i = 0; i < 20; i++) expect(await get()).toEqual({ status: 200, text: '127.0.0.4' });
    expect([a.seen.length, b.seen.length]).toEqual(before);
    expect(c.seen.length).toBeGreaterThan(20);
    expect(lookups).toBe(3);
  });

  it('after a quiet spell, waits for the new answer rather than send the first request to addresses long gone', async () => {
    const [a, b] = await pods();
    let answer = ['127.0.0.2'];
    const { clock, get } = await ambassadorWith(async () => ({ addresses: answer }), {
      UPSTREAM_URL: `http://inventory.test:${a.port}`,
      DNS_REFRESH_MS: '5000',
    });
    expect((await get()).text).toBe('127.0.0.2');
    await a.close(); // the pod is replaced while no request comes
    answer = ['127.0.0.3'];
    clock.offset += 60_000;
    expect(await get()).toEqual({ status: 200, text: '127.0.0.3' });
    expect(b.seen).toHaveLength(1);
  });

  it('keeps the endpoints it knows when a lookup fails, and says so once in the log', async () => {
    const [a] = await pods();
    let fail = false;
    const { clock, lines, get } = await ambassadorWith(async () => {
      if (fail) throw Object.assign(new Error('queryA ESERVFAIL inventory.test'), { code: 'ESERVFAIL' });
      return { addresses: ['127.0.0.2'] };
    }, { UPSTREAM_URL: `http://inventory.test:${a.port}` });
    expect((await get()).status).toBe(200);
    fail = true;
    clock.offset += 6000;
    for (let i = 0; i < 5; i++) expect(await get()).toEqual({ status: 200, text: '127.0.0.2' });
    const warnings = lines.filter((l) => String(l.msg).startsWith('discovery failed'));
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatchObject({ level: 'warn', route: 'default', endpoints: [`127.0.0.2:${a.port}`] });
    expect(String(warnings[0].msg)).toContain('ESERVFAIL');
  });

  it("looks up again when the records' TTL runs out, before DNS_REFRESH_MS", async () => {
    const [a] = await pods();
    let lookups = 0;
    const { clock, get } = await ambassadorWith(async () => {
      lookups++;
      return { addresses: ['127.0.0.2'], ttlMs: 2000 };
    }, { UPSTREAM_URL: `http://inventory.test:${a.port}`, DNS_REFRESH_MS: '60000' });
    await get();
    clock.offset += 1000;
    await get();
    expect(lookups).toBe(1);
    clock.offset += 1500;
    await get();
    expect(lookups).toBe(2);
  });

  it("goes on with the name itself when the first lookup fails, so the runtime's own error reaches the log", async () => {
    const { get, lines } = await ambassadorWith(async () => {
      throw Object.assign(new Error('getaddrinfo ENOTFOUND nowhere.invalid'), { code: 'ENOTFOUND' });
    }, { UPSTREAM_URL: 'http://nowhere.invalid:9', RETRY_ATTEMPTS: '1' });
    const res = await get();
    expect(res.status).toBe(502);
    expect(res.text).toMatch(/ENOTFOUND/);
    expect(lines.some((l) => String(l.msg).startsWith('discovery failed'))).toBe(true);
  });
});

describe('the Node resolver', () => {
  it('answers from the hosts file for a name DNS does not know', async () => {
    const found = await nodeResolve(dns)('localhost');
    expect(found.addresses).toContain('127.0.0.1');
  });
});
