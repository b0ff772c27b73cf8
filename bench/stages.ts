/**
 * The request path's own work, stage by stage: each stage's code run on its own, many times over, on the
 * inputs of one small GET (the headers an app and nginx send), in ns per request, on the runtime that runs
 * this file:
 *
 *   npm run bench:stages          Node 24 (the TypeScript as it is, types stripped) and Bun, one after the other
 *   bun bench/stages.ts --iterations N     one runtime, N calls a stage (default 200000)
 *
 * What it cannot see is the work these stages cause inside the runtime (the extra header bytes written, the
 * promise turns between steps, the server adapter): `npm run bench` measures the whole, as CPU per request
 * beside the runtime's bare proxy, and the difference between the two is that remainder.
 */
import {
  appCloses,
  appReply,
  Breaker,
  Cancel,
  clearTimer,
  ConcurrencyLimit,
  createLogger,
  earlyAnswer,
  FetchAppRequest,
  forwardHeaders,
  type HeaderList,
  headerValue,
  loadConfig,
  logEvents,
  matchRoute,
  Metrics,
  NodeAppRequest,
  type NodeIncoming,
  type NodeOutgoing,
  normalizePath,
  pickEndpoint,
  type Reply,
  type RequestRecord,
  RetryBudget,
  setTimer,
  updateEwma,
} from '../ambassador.ts';

const noop = () => {};

declare const process: { argv: string[]; versions: Record<string, string | undefined> };

const at = process.argv.indexOf('--iterations');
const N = at >= 0 ? Number(process.argv[at + 1]) : 200_000;
const runtime = process.versions.bun ? `Bun ${process.versions.bun}` : `Node ${process.versions.node}`;

/** ns per call of `f`: the median of five runs of N calls, after a warm-up. */
function time(f: () => unknown): number {
  for (let i = 0; i < N / 4; i++) f();
  const runs: number[] = [];
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    for (let i = 0; i < N; i++) f();
    runs.push(((performance.now() - t0) * 1e6) / N);
  }
  return runs.sort((a, b) => a - b)[2];
}

// One small GET as an app sends it, and nginx's answer to it.
const APP_HEADERS: HeaderList = [
  ['host', '127.0.0.1:8080'],
  ['user-agent', 'order-service/1.0'],
  ['accept', 'application/json'],
  ['accept-encoding', 'gzip, deflate'],
  ['connection', 'keep-alive'],
  ['traceparent', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'],
];
const UPSTREAM_HEADERS: HeaderList = [
  ['server', 'nginx/1.22.1'],
  ['date', 'Fri, 04 Dec 2026 20:00:00 GMT'],
  ['content-type', 'application/json'],
  ['content-length', '52'],
  ['connection', 'keep-alive'],
];
const config = loadConfig({ UPSTREAM_URL: 'http://127.0.0.1:9000' });

// The request as the runtime's server hands it over.
const rawHeaders = APP_HEADERS.flatMap(([k, v]) => [k, v]);
const incoming = {
  method: 'GET',
  url: '/small?id=42',
  rawHeaders,
  socket: { remoteAddress: '127.0.0.1' },
  [Symbol.asyncIterator]: () => ({ next: () => Promise.resolve({ done: true, value: undefined }) }),
} as unknown as NodeIncoming;
const outgoing = { once: () => {} } as unknown as NodeOutgoing;
const written = new Response(null);
const request = new Request('http://127.0.0.1:8080/small?id=42', { headers: APP_HEADERS });
// On Bun as its server makes it: told how to ask for the app's address (the asking itself is Bun's, not timed).
const peer = { address: '127.0.0.1' };
const appRequest = () =>
  process.versions.bun
    ? new FetchAppRequest(request, () => peer, true, () => written)
    : new NodeAppRequest(incoming, outgoing, written);
const req = appRequest();

const breaker = new Breaker({ failures: 5, openMs: 5000, openMaxMs: 60000, probes: 1 });
const endpoint = { inFlight: 0, ewmaMs: 0, lastSampleAt: 0, breaker };
const budget = new RetryBudget(20, 10);
const concurrency = new ConcurrencyLimit(1024, 128);
const tried = new Set<typeof endpoint>();
const record = (): RequestRecord => ({
  id: '3f1c1a8e-7c1b-4f7e-9a55-0c9d2f4b6a11',
  route: 'default',
  endpoint: '127.0.0.1:9000',
  method: 'GET',
  path: '/small',
  status: 200,
  attempts: 1,
  durationMs: 0.84,
  upstreamMs: 0.52,
  bytesIn: 0,
  bytesOut: 52,
});
const metrics = new Metrics({ version: 'bench', runtime, startTimeSeconds: 0 }).events();
const log = logEvents(createLogger('json', 'info', () => {}), 'info');
const upstreamReply = (): Reply => ({ status: 200, statusText: 'OK', headers: UPSTREAM_HEADERS, body: null });

const stages: Array<[string, () => unknown]> = [
  ['the request as an AppRequest (method, target, header list)', appRequest],
  ['head and path checks (request id, path, early answers)', () => {
    const given = headerValue(req.headers, 'x-request-id');
    const id = given ?? crypto.randomUUID();
    const path = normalizePath('/small');
    appCloses(req.headers);
    return earlyAnswer(req, headerValue(req.headers, 'host'), path) ?? id;
  }],
  ['route', () => matchRoute(config.routes, '127.0.0.1:8080', '/small')],
  ['admission (concurrency limit; no rate limit set)', () => {
    concurrency.acquire();
    concurrency.release();
  }],
  ['endpoint pick, breaker, budget, latency average', () => {
    const now = performance.now();
    budget.recordRequest(now);
    const e = pickEndpoint([endpoint], tried, now, Math.random);
    const probe = e!.breaker.admit(now);
    e!.breaker.record(now, true, probe);
    updateEwma(e!, 0.5, now);
  }],
  ['header shaping, both ways', () => {
    forwardHeaders(req.headers, '3f1c1a8e-7c1b-4f7e-9a55-0c9d2f4b6a11', '127.0.0.1');
    return appReply(upstreamReply(), 'GET', '3f1c1a8e-7c1b-4f7e-9a55-0c9d2f4b6a11');
  }],
  ['timers and cancellation (the app, the attempt, its timer)', () => {
    const gone = new Cancel();
    const attempt = new Cancel();
    const off = gone.on((reason) => attempt.abort(reason));
    clearTimer(setTimer(noop, 5000));
    off();
  }],
  ['the request record, in flight', () => {
    const inFlight = new Map<number, RequestRecord>();
    inFlight.set(1, record());
    inFlight.delete(1);
  }],
  ['metrics', () => {
    metrics.attemptResponded({
      id: 'x',
      route: 'default',
      endpoint: '127.0.0.1:9000',
      attempt: 1,
      status: 200,
      seconds: 0.0005,
    });
    metrics.requestDone(record());
  }],
  ['the access-log line (info, JSON)', () => log.requestDone(record())],
];

console.log(`\nThe request path's own stages on ${runtime} (${N} calls each; ns per request, median of 5 runs):\n`);
console.log('| stage | ns / request |\n|---|---|');
let sum = 0;
for (const [name, f] of stages) {
  const ns = time(f);
  sum += ns;
  console.log(`| ${name} | ${ns.toFixed(0)} |`);
}
console.log(`| **all stages** | **${sum.toFixed(0)}** |`);
