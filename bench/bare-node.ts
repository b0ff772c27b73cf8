/** The bare Node baseline for the benchmark: a node:http server that forwards each request with
 * http.request over a keep-alive agent, bodies piped both ways — and nothing else. What the ambassador
 * costs beyond this on Node is the ambassador's own work. UPSTREAM_URL and PORT as the ambassador's. */
import http from 'node:http';

const upstream = new URL(process.env.UPSTREAM_URL ?? 'http://127.0.0.1:9000');
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

http.createServer((req, res) => {
  const headers = { ...req.headers, host: upstream.host };
  const out = http.request({
    host: upstream.hostname,
    port: upstream.port,
    method: req.method,
    path: req.url,
    headers,
    agent,
  }, (up) => {
    res.writeHead(up.statusCode ?? 502, up.headers);
    up.pipe(res);
  });
  out.on('error', () => res.headersSent ? res.destroy() : res.writeHead(502).end());
  req.pipe(out);
}).listen(Number(process.env.PORT ?? 8080), '127.0.0.1');
