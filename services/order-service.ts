/**
 * The order service of the demo: `GET /order` asks the inventory for stock — through the ambassador on
 * localhost, never the inventory directly — and answers `Order received. Inventory says: {...}`. With
 * PAYMENTS_PATH set it then charges the order with a POST there, through the same ambassador, and adds
 * `Payments says: {...}`. It knows nothing of retries, timeouts, TLS certificates or where its
 * dependencies run: that is the ambassador's job.
 *
 * | variable       | default               | meaning                                            |
 * |----------------|-----------------------|----------------------------------------------------|
 * | PORT / HOST    | 3000 / 0.0.0.0        | where it listens                                   |
 * | AMBASSADOR_URL | http://localhost:8080 | the ambassador next to this app                    |
 * | PAYMENTS_PATH  | (none)                | e.g. /payments: also POST there; empty = no payment |
 *
 * Run: node dist/services/order-service.mjs, or deno run --allow-net --allow-env services/order-service.ts
 */
import { Hono } from 'hono';
import { environment, fail, intVar, serve } from './serve.ts';

const env = environment();
const ambassador = env.AMBASSADOR_URL?.trim() || 'http://localhost:8080';
if (!/^https?:\/\/[^/]+/.test(ambassador)) {
  fail(`AMBASSADOR_URL=${JSON.stringify(ambassador)}: expected an http:// URL`);
}
const paymentsPath = env.PAYMENTS_PATH?.trim() || '';
if (paymentsPath && !paymentsPath.startsWith('/')) {
  fail(`PAYMENTS_PATH=${JSON.stringify(paymentsPath)}: expected a path starting with /`);
}
const base = ambassador.replace(/\/$/, '');

const app = new Hono();

app.get('/healthz', (c) => c.text('ok\n'));

app.get('/order', async (c) => {
  try {
    const res = await fetch(`${base}/inventory`);
    const body = await res.text();
    if (!res.ok) return c.text(`upstream error: ${res.status} ${body.trim()}\n`, 502);
    if (!paymentsPath) return c.text(`Order received. Inventory says: ${body}`);
    const paid = await fetch(`${base}${paymentsPath}`, {
      method: 'POST',
      body: JSON.stringify({ item: 'widget', quantity: 1 }),
      headers: { 'content-type': 'application/json' },
    });
    const receipt = await paid.text();
    if (!paid.ok) return c.text(`payments error: ${paid.status} ${receipt.trim()}\n`, 502);
    return c.text(`Order received. Inventory says: ${body}. Payments says: ${receipt}`);
  } catch (err) {
    const cause = (err as { cause?: { message?: string } }).cause?.message;
    return c.text(`upstream error: ${cause ?? (err as Error).message}\n`, 502);
  }
});

void serve('order', app, env.HOST?.trim() || '0.0.0.0', intVar(env, 'PORT', 3000, 0, 65535));
