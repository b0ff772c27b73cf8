/** Routing several dependencies through one ambassador: routes from a JSON file (ROUTES_FILE), each a path
 * prefix and optionally a Host, with its own upstream and policy; a request no route takes gets 404. */
import { describe, expect, it } from 'vitest';
import {
  ARTIFACTS,
  command,
  rawRequest,
  routesFile,
  scrape,
  startAmbassador,
  startProcess,
  startUpstream,
  stopAfterEach,
} from './helpers.ts';

describe.each(ARTIFACTS)('routing through one ambassador (%s)', (runtime) => {
  stopAfterEach();

  it('sends each prefix to its own upstream with its own policy, and answers 404 where no route matches', async () => {
    let flaky = 0;
    const inventory = await startUpstream((q, res) => {
      res.writeHead(q.url === '/flaky' && flaky++ === 0 ? 503 : 200); // the first /flaky fails
      res.end(`inventory saw ${q.url}`);
    });
    const payments = await startUpstream((q, res) => {
      res.writeHead(q.url === '/payments/charge' ? 503 : 200);
      res.end(`payments saw ${q.url} for ${q.headers.host}`);
    });
    const file = routesFile([
      { name: 'inventory', prefix: '/inventory', upstream: inventory.url, stripPrefix: true },
      { name: 'payments', prefix: '/payments', upstream: payments.url, retryAttempts: 1 },
    ]);
    const amb = await startAmbassador(runtime, { ROUTES_FILE: file });

    const get = async (p: string, init?: RequestInit) => {
      const res = await fetch(`${amb.url}${p}`, init);
      return { status: res.status, text: await res.text() };
    };
    expect(await get('/inventory/items/a%2Fb?x=1')).toEqual({ status: 200, text: 'inventory saw /items/a%2Fb?x=1' });
    // Routed on the normalized path, so dot segments cannot carry a request past its route.
    expect(
      await rawRequest(
        amb.port,
        'GET /shipping/../inventory/items HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n',
      ),
    ).toMatch(/\r\n(inventory saw \/items\r\n|inventory saw \/items$)/);
    expect(await get('/payments/balance')).toEqual({
      status: 200,
      text: `payments saw /payments/balance for 127.0.0.1:${payments.port}`,
    });

    // inventory retries (the default policy); payments has retryAttempts 1, so its POST is tried once.
    expect((await get('/inventory/flaky')).status).toBe(200);
    expect(inventory.seen.filter((s) => s.url === '/flaky')).toHaveLength(2);
    expect((await get('/payments/charge', { method: 'POST', body: 'x', headers: { 'idempotency-key': 'k1' } })).status)
      .toBe(503);
    expect(payments.seen.filter((s) => s.url === '/payments/charge')).toHaveLength(1);

    const unmatched = await get('/shipping/42');
    expect(unmatched).toEqual({ status: 404, text: `ambassador: no route for 127.0.0.1:${amb.port}/shipping/42\n` });
    expect(inventory.seen.length + payments.seen.length).toBe(6); // the 404 went nowhere

    const m = await scrape(amb);
    expect(m.get('ambassador_requests_total{route="inventory",method="GET",code="200"}')).toBe(3);
    expect(m.get('ambassador_requests_total{route="payments",method="POST",code="503"}')).toBe(1);
    expect(m.get('ambassador_requests_total{route="",method="GET",code="404"}')).toBe(1);
    expect(m.get('ambassador_requests_rejected_total{route="",reason="no_route"}')).toBe(1);
    expect(m.get('ambassador_upstream_retries_total{route="inventory"}')).toBe(1);
    await amb.settled();
    const line = amb.logs().find((l) => l.status === 404);
    expect(line).toMatchObject({
      route: '',
      rejected: 'no_route',
      error: `no route for 127.0.0.1:${amb.port}/shipping/42`,
    });
  });

  it('stops at start on a bad routes file, naming the file and the field', async () => {
    const file = routesFile([{ name: 'inventory', prefix: '/inventory', upstream: 'http://x', tryTimeoutMs: 'soon' }]);
    const p = startProcess(command(runtime), { ROUTES_FILE: file, PORT: '0', ADMIN_PORT: '0' });
    expect((await p.exited).code).toBe(2);
    expect(p.stderr.join('\n')).toContain(
      `ROUTES_FILE=${
        JSON.stringify(file)
      }: routes[0].tryTimeoutMs: expected a whole number from 0 to 2147483647, got "soon"`,
    );
  });

  it('matches a prefix at whole path segments only, end to end: /inventory takes /inventory/42, not /inventory-old', async () => {
    const inventory = await startUpstream((q, res) => res.end(`inventory ${q.url}`));
    const rest = await startUpstream((q, res) => res.end(`rest ${q.url}`));
    const file = routesFile([
      { name: 'inventory', prefix: '/inventory', upstream: inventory.url },
      { name: 'rest', prefix: '/', upstream: rest.url },
    ]);
    const amb = await startAmbassador(runtime, { ROUTES_FILE: file });
    const text = async (p: string) => (await fetch(`${amb.url}${p}`)).text();
    expect(await text('/inventory')).toBe('inventory /inventory');
    expect(await text('/inventory/42')).toBe('inventory /inventory/42');
    expect(await text('/inventory-old')).toBe('rest /inventory-old');
    expect(await text('/inventoryx/1')).toBe('rest /inventoryx/1');
  });
});
