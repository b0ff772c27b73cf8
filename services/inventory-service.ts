/**
 * The inventory service of the demo: `GET /inventory` answers {"item":"widget","stock":42}.
 *
 * So that a person can watch the ambassador at work without editing code, it can be made slow or
 * failing, by environment (for every request) or by query (for one request):
 *
 * | variable      | query          | default | effect                                                       |
 * |---------------|----------------|---------|--------------------------------------------------------------|
 * | PORT / HOST   |                | 9000 / 0.0.0.0 | where it listens                                      |
 * | DELAY_MS      | ?delay_ms=N    | 0       | wait N ms before answering                                   |
 * | FAIL_EVERY    | ?fail_every=N  | 0       | every Nth request answers 503, the first included (2 = every other one), counted per query string; 0 = never |
 * | FAIL_PERCENT  | ?fail_percent=N| 0       | N % of requests, at random, answer 503                       |
 * | RETRY_AFTER   | ?retry_after=S | (none)  | add `Retry-After: S` to the 503s                             |
 *
 * Run: node dist/services/inventory-service.mjs, or deno run --allow-net --allow-env services/inventory-service.ts
 */
import { Hono } from 'hono';
import { environment, fail, intVar, log, serve } from './serve.ts';

const env = environment();
const defaults = {
  delayMs: intVar(env, 'DELAY_MS', 0),
  failEvery: intVar(env, 'FAIL_EVERY', 0),
  failPercent: intVar(env, 'FAIL_PERCENT', 0, 0, 100),
  retryAfter: env.RETRY_AFTER?.trim() || undefined,
};
if (defaults.retryAfter !== undefined && !/^\d+$/.test(defaults.retryAfter)) {
  fail(`RETRY_AFTER=${JSON.stringify(defaults.retryAfter)}: expected a whole number of seconds`);
}

/** Requests served, counted apart for each query string: `?fail_every=2` fails its own first request
 * whatever came before it, as the README's walk-through promises. */
const served = new Map<string, number>();
const app = new Hono();

app.get('/healthz', (c) => c.text('ok\n'));

app.get('/inventory', async (c) => {
  const query = new URL(c.req.url).search;
  const n = (served.get(query) ?? 0) + 1;
  served.set(query, n);
  const q = (name: string) => {
    const v = c.req.query(name);
    return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
  };
  const delayMs = q('delay_ms') ?? defaults.delayMs;
  const failEvery = q('fail_every') ?? defaults.failEvery;
  const failPercent = q('fail_percent') ?? defaults.failPercent;
  const retryAfter = c.req.query('retry_after') ?? defaults.retryAfter;
  if (delayMs > 0) await new Promise((r) => setTimeout(r, delayMs));
  // The 1st, then every Nth after it: the first request of a flaky query shows a retry at once.
  const failing = (failEvery > 0 && (n - 1) % failEvery === 0) || Math.random() * 100 < failPercent;
  if (failing) {
    log('inventory', 'failing on purpose', { request: n, status: 503 });
    if (retryAfter !== undefined) c.header('retry-after', retryAfter);
    return c.text('inventory unavailable\n', 503);
  }
  return c.json({ item: 'widget', stock: 42 });
});

void serve('inventory', app, env.HOST?.trim() || '0.0.0.0', intVar(env, 'PORT', 9000, 0, 65535));
