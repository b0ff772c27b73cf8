/** The naive Hono baseline for the benchmark: a Hono app that proxies each request with fetch, on
 * Deno.serve — what a dozen lines of Hono give before any of the ambassador's rules. UPSTREAM_URL and
 * PORT as the ambassador's. Run with `deno run --allow-net --allow-env`. */
import { Hono } from 'hono';

declare const Deno: {
  env: { get(name: string): string | undefined };
  serve(
    options: { hostname: string; port: number; onListen?: () => void },
    handler: (req: Request) => Response | Promise<Response>,
  ): unknown;
};

const upstream = Deno.env.get('UPSTREAM_URL') ?? 'http://127.0.0.1:9000';
const app = new Hono();
app.all('*', (c) => {
  const url = new URL(c.req.url);
  return fetch(
    upstream + url.pathname + url.search,
    { method: c.req.method, headers: c.req.raw.headers, body: c.req.raw.body, duplex: 'half' } as RequestInit,
  );
});

Deno.serve({ hostname: '127.0.0.1', port: Number(Deno.env.get('PORT') ?? 8080), onListen() {} }, app.fetch);
