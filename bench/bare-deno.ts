/** The bare Deno baseline for the benchmark: Deno.serve handing each request to fetch — and nothing else.
 * UPSTREAM_URL and PORT as the ambassador's. Run with `deno run --allow-net --allow-env`. */
declare const Deno: {
  env: { get(name: string): string | undefined };
  serve(
    options: { hostname: string; port: number; onListen?: () => void },
    handler: (req: Request) => Response | Promise<Response>,
  ): unknown;
};

const upstream = Deno.env.get('UPSTREAM_URL') ?? 'http://127.0.0.1:9000';

Deno.serve({ hostname: '127.0.0.1', port: Number(Deno.env.get('PORT') ?? 8080), onListen() {} }, (req) => {
  const url = new URL(req.url);
  return fetch(upstream + url.pathname + url.search, { method: req.method, headers: req.headers, body: req.body });
});
