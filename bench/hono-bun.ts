/** The bare Bun baseline for the benchmark: a Hono app that proxies each request with fetch on Bun.serve
 * — what a dozen lines of Hono give on Bun before any of the ambassador's rules. UPSTREAM_URL and PORT as
 * the ambassador's. Run with `bun bench/hono-bun.ts`. */
import { Hono } from 'hono';

declare const Bun: {
  serve(options: { hostname: string; port: number; fetch: (req: Request) => Response | Promise<Response> }): unknown;
};
declare const process: { env: Record<string, string | undefined> };

const upstream = process.env.UPSTREAM_URL ?? 'http://127.0.0.1:9000';
const app = new Hono();
app.all('*', (c) => {
  const url = new URL(c.req.url);
  return fetch(
    upstream + url.pathname + url.search,
    { method: c.req.method, headers: c.req.raw.headers, body: c.req.raw.body, duplex: 'half' } as RequestInit,
  );
});

Bun.serve({ hostname: '127.0.0.1', port: Number(process.env.PORT ?? 8080), fetch: app.fetch });
