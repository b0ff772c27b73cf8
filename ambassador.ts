/**
 * ambassador — a small HTTP ambassador sidecar.
 *
 * The app talks plain HTTP to the ambassador on localhost; the ambassador forwards each request to its
 * upstream and deals with the network on the app's behalf: routing (one upstream, or path-prefix routes
 * from a file), discovery of the addresses behind a name, least-loaded balancing (power of two choices),
 * a circuit breaker per endpoint, concurrency and rate limits, retries with backoff and a retry budget,
 * per-try and per-request timeouts, TLS (mTLS too) to the upstream, hop-by-hop hygiene, request ids,
 * WebSocket pass-through, structured logs, and a graceful drain on SIGTERM/SIGINT. A separate admin port
 * serves GET /healthz, GET /readyz, GET /metrics (Prometheus or OpenMetrics) and POST /shutdown (loopback
 * clients only).
 *
 * Run it:
 *   Node:   npm run build && UPSTREAM_URL=http://127.0.0.1:9000 node dist/ambassador.mjs
 *   Deno:   UPSTREAM_URL=http://127.0.0.1:9000 \
 *             deno run --allow-net --allow-env --allow-read --unstable-no-legacy-abort ambassador.ts
 *   Bun:    UPSTREAM_URL=http://127.0.0.1:9000 bun ambassador.ts
 *   Binary: npm run sea && UPSTREAM_URL=http://127.0.0.1:9000 ./bin/ambassador-node   (Node single executable)
 *           deno task compile && UPSTREAM_URL=http://127.0.0.1:9000 ./bin/ambassador  (needs Deno's denort)
 *           npm run compile:bun && UPSTREAM_URL=http://127.0.0.1:9000 ./bin/ambassador-bun   (Bun)
 *
 * This file imports only `hono` and, on Node only and dynamically, Node's own `node:http`, `node:https`,
 * `node:tls`, `node:crypto`, `node:dns` and `node:fs` (Deno and Bun reach some of the same built-ins), so it
 * can be copied into another project as it is.
 *
 * | variable                   | default    | meaning
 * |----------------------------|------------|---------
 * | UPSTREAM_URL               | (required) | http(s):// base URL, or several, comma-separated; the path follows
 * | ROUTES_FILE                | (none)     | a JSON file of routes instead (`loadConfig`); * marks their defaults
 * | HOST                       | 127.0.0.1  | the proxy's address (an IP, or localhost): loopback, for the pod's app
 * | PORT                       | 8080       | the proxy's port; 0 = any free port
 * | ADMIN_HOST                 | 0.0.0.0    | the admin endpoints' address, apart from every upstream path
 * | ADMIN_PORT                 | 9901       | the admin endpoints' port; 0 = any free port
 * | RETRY_ATTEMPTS *           | 3          | attempts in all, the first included; 1 = no retries
 * | RETRY_BACKOFF_MS *         | 100        | base of the exponential backoff (full jitter) between attempts
 * | RETRY_BACKOFF_MAX_MS *     | 2000       | cap of one backoff delay
 * | RETRY_BUDGET_PERCENT *     | 20         | retries allowed, as a percentage of requests over the last 10 s
 * | RETRY_BUDGET_MIN_PER_SEC * | 10         | retries per second always allowed, whatever the percentage says
 * | RETRY_BODY_MAX_BYTES *     | 65536      | largest request body kept for replay; 0 = never replay a body
 * | RETRY_BODIES_MAX_BYTES     | 8388608    | all bodies kept for replay at once; past it a body is sent once
 * | MEMORY_SHED_PERCENT        | 90         | past this share of the memory limit, new requests get 503; 0 = never
 * | MEMORY_LIMIT_BYTES         | 0          | that limit; 0 = the cgroup's, read at start (none: never shed)
 * | CPU_LIMIT_MILLICORES       | 0          | the CPU limit (100 = 100m); 0 = the cgroup's, read at start
 * | TRY_TIMEOUT_MS *           | 5000       | one attempt's limit until response headers; 0 = none
 * | REQUEST_TIMEOUT_MS *       | 15000      | the request's limit until response headers, retries included; 0 = none
 * | BREAKER_FAILURES *         | 5          | failures in a row (5xx, refused, reset, timeout) that eject; 0 = none
 * | BREAKER_OPEN_MS *          | 5000       | how long the first ejection lasts; each one soon after doubles it
 * | BREAKER_OPEN_MAX_MS *      | 60000      | the longest an ejection lasts
 * | BREAKER_PROBES *           | 1          | requests let through at once to a half-open endpoint
 * | MAX_IN_FLIGHT *            | 1024       | requests in flight to a route's upstream at most; 0 = no limit
 * | QUEUE_SIZE *               | 128        | requests that may wait for a place; the rest get 503 at once
 * | QUEUE_TIMEOUT_MS *         | 1000       | the longest a request waits in that queue before its 503
 * | PROCESS_MAX_IN_FLIGHT      | (derived)  | requests in flight in all routes together (to the answer's head, and to
 * |                            |            | the end of a body over 64 KiB); more wait, up to REQUEST_TIMEOUT_MS, then
 * |                            |            | 503. Unset: one per 4 MiB of the memory limit (32 at 128 MiB) or one per
 * |                            |            | 3 ms of CPU a second (33 at 100m), the fewer, at least 4; none without
 * |                            |            | either limit; 0 = no limit
 * | QUEUE_NEWEST_FIRST_MS      | 1000       | once the longest waiter for a place (either queue) has waited this long,
 * |                            |            | the newest goes first; 0 = always first come, first served
 * | RATE_LIMIT_PER_SEC *       | 0          | requests per second to a route's upstream (token bucket); 0 = none
 * | RATE_LIMIT_BURST *         | 0          | tokens saved up for a burst; 0 = one second's worth
 * | RATE_LIMIT_WAIT_MS *       | 0          | wait up to this long for a token instead of answering 429 at once
 * | DNS_REFRESH_MS *           | 5000       | look names up again this often (sooner if the TTL says); 0 = never
 * | UPSTREAM_CA_FILE           | (none)     | PEM CA bundle the upstream's certificate is verified against
 * | UPSTREAM_CERT_FILE         | (none)     | PEM client certificate, with UPSTREAM_KEY_FILE (mTLS); read on change
 * | UPSTREAM_KEY_FILE          | (none)     | PEM key of that certificate
 * | UPSTREAM_SERVER_NAME       | (none)     | the name sent as SNI and checked in the certificate (Node, Bun)
 * | UPSTREAM_TLS_MIN_VERSION   | TLSv1.2    | TLSv1.2 or TLSv1.3 (Node only)
 * | DRAIN_TIMEOUT_MS           | 20000      | the longest a drain may take before what is left is cut off
 * | DRAIN_GRACE_MS             | 0          | after SIGTERM, keep accepting new requests this long (older clusters)
 * | BODY_IDLE_TIMEOUT_MS       | 300000     | a body that stalls this long is cut off (a request body: 408); 0 = never
 * | LOG_FORMAT                 | json       | json (one object per line) or text
 * | LOG_LEVEL                  | info       | debug, info (one line per request), warn (failures only) or error
 *
 * The file, in the order a request lives (each a banner below; search for its first words):
 *   What it is — constants, the settings, and the types a reader meets first (`AppRequest`, `Reply`, `Send`)
 *   The request path — intake (`handle`), early answers, route and admission, forward (`attempts`,
 *     `tryEndpoint`, `attempt`), the reply
 *   The ambassador put together — `createAmbassador`, the admin app, each route's policies
 *   Policies — retry, breaker and balancing, limits, routing and paths, headers and replies
 *   Bodies — replay, streaming, passing a response body on
 *   WebSockets — the tunnel a 101 opens: bytes (Node) or messages (Deno, Bun), frames read and written
 *   Endpoints and TLS files — discovery, certificates read again when they change
 *   Logs, Metrics — what the events become
 *   Configuration — `loadConfig`, the routes file, what a runtime must be able to do
 *   Runtimes — Node, Deno, Bun (server, client, resolver), the admin port
 *   main — listen, drain on SIGTERM, the entry check
 */

import { Hono } from 'hono';

// =========================================================================================================
// What it is: the constants, and the types a reader meets first
// =========================================================================================================

const VERSION = '0.1.0';
const VIA = '1.1 ambassador';

/** RFC 9110 §9.2.2: a client may repeat these without changing the outcome. TRACE is idempotent too, but
 * fetch refuses to send it, so the ambassador refuses it (see `refusal`). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE']);

/** Methods fetch cannot send (Fetch standard "forbidden method"): answered 405 on every runtime alike,
 * rather than forwarded by one runtime and refused by another. */
const REFUSED_METHODS = new Set(['CONNECT', 'TRACE', 'TRACK']);

/** Statuses that mean "the upstream, or what is in front of it, could not serve this now". */
const RETRYABLE_STATUS = new Set([502, 503, 504]);

/** Statuses whose response has no body (RFC 9110 §6.4.1); `new Response` refuses a body with them. */
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);

const BUDGET_WINDOW_SECONDS = 10;

const noop = () => {};

/** Node's default `maxHeaderSize`: the largest response head passed on, and the largest request head
 * taken, on every runtime. Node's own parser holds requests to it; elsewhere the handler does. */
const MAX_RESPONSE_HEAD_BYTES = 16 * 1024;
const MAX_REQUEST_HEAD_BYTES = 16 * 1024;
/** The most header fields a request may carry (RFC 6585 §5: 431). Node's server would drop the ones past
 * its own count silently; every runtime refuses the request instead. */
const MAX_REQUEST_HEADERS = 100;

/** An app's x-request-id is kept when it is safe to log and to send on: at most 128 printable ASCII
 * characters, no spaces, quotes or backslashes. Anything else is replaced by a fresh id. */
const SAFE_REQUEST_ID = /^[!#-\[\]-~]{1,128}$/; // 0x21–0x7e less `"` and `\`

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
/** `notice` is for the lifecycle (start-up, drain stages): written whatever LOG_LEVEL says. */
type LineLevel = LogLevel | 'notice';
export type LogFormat = 'json' | 'text';
/** How Linux schedules the process's threads: `normal` (SCHED_OTHER), or `batch` (SCHED_BATCH: a thread that wakes
 * never preempts the one running on its CPU, and waits for that one's time slice to end). */
export type SchedPolicy = 'normal' | 'batch';

/** The longest a timer can wait: setTimeout takes a signed 32-bit count of ms, and fires at once past it
 * (Node says TimeoutOverflowWarning; the others say nothing). Every time setting is held to it. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The settings each route has: the environment variable that sets the default for every route, and the
 * key a route in ROUTES_FILE overrides it with. One table, so the two can never drift apart. */
const ROUTE_SETTINGS = [
  { key: 'retryAttempts', env: 'RETRY_ATTEMPTS', fallback: 3, min: 1, max: 100 },
  { key: 'retryBackoffMs', env: 'RETRY_BACKOFF_MS', fallback: 100, min: 0, max: MAX_TIMER_MS },
  { key: 'retryBackoffMaxMs', env: 'RETRY_BACKOFF_MAX_MS', fallback: 2000, min: 0, max: MAX_TIMER_MS },
  { key: 'retryBudgetPercent', env: 'RETRY_BUDGET_PERCENT', fallback: 20, min: 0, max: 100 },
  { key: 'retryBudgetMinPerSec', env: 'RETRY_BUDGET_MIN_PER_SEC', fallback: 10, min: 0 },
  { key: 'retryBodyMaxBytes', env: 'RETRY_BODY_MAX_BYTES', fallback: 64 * 1024, min: 0 },
  { key: 'tryTimeoutMs', env: 'TRY_TIMEOUT_MS', fallback: 5000, min: 0, max: MAX_TIMER_MS },
  { key: 'requestTimeoutMs', env: 'REQUEST_TIMEOUT_MS', fallback: 15000, min: 0, max: MAX_TIMER_MS },
  { key: 'breakerFailures', env: 'BREAKER_FAILURES', fallback: 5, min: 0 },
  { key: 'breakerOpenMs', env: 'BREAKER_OPEN_MS', fallback: 5000, min: 1, max: MAX_TIMER_MS },
  { key: 'breakerOpenMaxMs', env: 'BREAKER_OPEN_MAX_MS', fallback: 60_000, min: 1, max: MAX_TIMER_MS },
  { key: 'breakerProbes', env: 'BREAKER_PROBES', fallback: 1, min: 1 },
  { key: 'maxInFlight', env: 'MAX_IN_FLIGHT', fallback: 1024, min: 0 },
  { key: 'queueSize', env: 'QUEUE_SIZE', fallback: 128, min: 0 },
  { key: 'queueTimeoutMs', env: 'QUEUE_TIMEOUT_MS', fallback: 1000, min: 0, max: MAX_TIMER_MS },
  { key: 'rateLimitPerSec', env: 'RATE_LIMIT_PER_SEC', fallback: 0, min: 0 },
  { key: 'rateLimitBurst', env: 'RATE_LIMIT_BURST', fallback: 0, min: 0 },
  { key: 'rateLimitWaitMs', env: 'RATE_LIMIT_WAIT_MS', fallback: 0, min: 0, max: MAX_TIMER_MS },
  { key: 'dnsRefreshMs', env: 'DNS_REFRESH_MS', fallback: 5000, min: 0, max: MAX_TIMER_MS },
] as const;

export type RouteSettings = { readonly [S in (typeof ROUTE_SETTINGS)[number] as S['key']]: number };

/** TLS to an https:// upstream. Certificate verification is always on; the files are read again when they
 * change (Kubernetes Secrets mounted as files are rotated in place). */
export interface TlsFiles {
  readonly caFile: string | null; // null: the runtime's own roots
  readonly certFile: string | null; // with keyFile: a client certificate (mTLS)
  readonly keyFile: string | null;
  readonly serverName: string | null; // SNI and the name the certificate must carry; null: the URL's host
  readonly minVersion: 'TLSv1.2' | 'TLSv1.3';
}

/** Where requests go: every request whose Host (when `host` is set) and path prefix match. */
export interface Route extends RouteSettings {
  readonly name: string;
  readonly host: string | null;
  readonly prefix: string;
  readonly stripPrefix: boolean;
  /** one or more base URLs; a name may resolve to several addresses, each an endpoint */
  readonly upstreams: readonly URL[];
  readonly tls: TlsFiles | null;
  /** where the route was set: `routes[1]` of ROUTES_FILE, or null: the environment (UPSTREAM_URL) */
  readonly source: string | null;
}

export interface Config {
  readonly host: string;
  readonly port: number;
  readonly adminHost: string;
  readonly adminPort: number;
  readonly drainTimeoutMs: number;
  readonly drainGraceMs: number;
  readonly bodyIdleTimeoutMs: number;
  /** RETRY_BODIES_MAX_BYTES: what every body kept for replay may hold at once, together */
  readonly replayMemoryBytes: number;
  /** MEMORY_SHED_PERCENT: past this share of the memory limit the process runs under, new requests get 503 */
  readonly memoryShedPercent: number;
  /** MEMORY_LIMIT_BYTES: that limit, when it is not the cgroup's; 0: the cgroup's (`Runtime.memory`) */
  readonly memoryLimitBytes: number;
  /** CPU_LIMIT_MILLICORES: the CPU limit, when it is not the cgroup's; 0: the cgroup's (`Runtime.cpu`) */
  readonly cpuLimitMillicores: number;
  /** PROCESS_MAX_IN_FLIGHT: requests in flight in all (0: no limit); null: from the memory and CPU limits
   * (`processPlaces`) */
  readonly processMaxInFlight: number | null;
  /** QUEUE_NEWEST_FIRST_MS: once a queue's longest waiter has waited this long, the newest goes first; 0:
   * always in order */
  readonly queueNewestFirstMs: number;
  readonly logFormat: LogFormat;
  readonly logLevel: LogLevel;
  /** SCHED_POLICY: `batch` runs the process's threads under Linux's SCHED_BATCH (`Runtime.scheduleBatch`) */
  readonly schedPolicy: SchedPolicy;
  readonly routesFile: string | null;
  /** most specific first: routes with a host before those without, then longer prefixes first */
  readonly routes: readonly Route[];
}

/** Why an attempt produced no usable response. `refused` and `dns` mean the upstream cannot have seen
 * the request; every other kind means it may have. */
export type FailureKind = 'refused' | 'dns' | 'reset' | 'timeout' | 'tls' | 'protocol' | 'other';

/** What one attempt came to: a response status, or a failure. */
export type AttemptOutcome = { status: number } | { failure: FailureKind };

export type SkipReason = 'attempts' | 'method' | 'body' | 'deadline' | 'budget' | 'circuit';

/** Why the ambassador answered a request itself, without asking the upstream. */
export type Rejection = 'no_route' | 'rate_limit' | 'concurrency' | 'circuit_open' | 'memory' | 'draining';

export type RetryDecision =
  | { retry: true; delayMs: number }
  | { retry: false; reason: 'final' | SkipReason };

export interface Logger {
  (level: LineLevel, msg: string, fields?: Record<string, unknown>): void;
}

/** What the handler reports; the log and the metrics subscribe. Policies never log. */
export interface Events {
  /** response headers arrived from the upstream, `seconds` after the attempt began */
  attemptResponded(
    e: { id: string; route: string; endpoint: string; attempt: number; status: number; seconds: number },
  ): void;
  attemptFailed(
    e: {
      id: string;
      route: string;
      endpoint: string;
      attempt: number;
      error: string;
      kind: FailureKind | 'status';
      status?: number;
      next: RetryDecision;
    },
  ): void;
  requestDone(e: RequestRecord): void;
  /** an endpoint's breaker opened (it is ejected for `openMs`), let a probe through, or closed again */
  endpointChanged(
    e: {
      route: string;
      endpoint: string;
      change: 'opened' | 'probing' | 'closed';
      openMs?: number;
      ejections?: number;
    },
  ): void;
  /** discovery found endpoints added or removed, or could not resolve a name (`error`; the old ones stay) */
  endpointsChanged(e: { route: string; added: string[]; removed: string[]; endpoints: string[]; error?: string }): void;
  /** a route's TLS files changed and were taken up, or could not be (`error`; the old ones stay) */
  tlsReloaded(e: { route: string; error?: string }): void;
  /** the process came near the memory limit it runs under and sheds new requests, or is back below it */
  memoryPressure(e: { shedding: boolean; usedBytes: number; limitBytes: number; percent: number }): void;
  /** an upstream accepted a WebSocket handshake: the tunnel is open (`requestDone` tells how it closed) */
  tunnelOpened(e: { id: string; route: string; endpoint: string }): void;
}

export interface RequestRecord {
  id: string;
  route: string; // '' when no route matched
  endpoint: string | null; // the last endpoint tried
  rejected?: Rejection;
  method: string;
  path: string;
  status: number;
  attempts: number;
  durationMs: number;
  upstreamMs: number | null;
  bytesIn: number;
  bytesOut: number;
  error?: string;
  /** a WebSocket handshake (101: its tunnel, whose bytes the upstream took and sent are bytesIn and bytesOut) */
  websocket?: boolean;
  /** how its tunnel ended */
  closedBy?: TunnelEnd;
}

/** A limit of ours ran out (per try, per request, body idle); `classifyFailure` calls it `timeout`. */
class TimeoutError extends Error {
  override name = 'TimeoutError';
}

/** The app's request is at fault, not the upstream: a request body that stalls (408) or breaks its framing
 * (400), a request our own client refuses to send (400). Answered with `status`; never retried, never held
 * against an endpoint. */
class ClientError extends Error {
  override name = 'ClientError';
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

/** Headers as the wire has them: [name, value] pairs in order, names lower-case, repeats kept. Plain
 * arrays cost far less than `Headers` objects on the hot path, and every runtime takes them as they are. */
export type HeaderList = Array<[string, string]>;

/** One request as the app sent it, whichever runtime's server read it. Each runtime's adapter makes one
 * (`NodeAppRequest`, `FetchAppRequest`) and writes back what the handler answers, so the request path
 * never asks which runtime it runs on. */
export interface AppRequest {
  readonly method: string;
  /** the request target: as sent (Node: `/path?query`, `*`, or an absolute URL), or the path and query of
   * the URL the server made of it (Deno, Bun) */
  readonly target: string;
  /** what the checks on the target's bytes look at: the target as sent, or the URL the server made */
  readonly seen: string;
  /** servers that hand over a URL rather than the target (Deno, Bun): that URL's authority, which differs
   * from the Host header only for an absolute-form target; undefined where the target tells that itself */
  readonly urlHost: string | undefined;
  readonly headers: HeaderList;
  /** the app's address */
  readonly peer: string | undefined;
  /** the HTTP version its request line gave, where the server hands it over (Node's); Deno's and Bun's
   * servers answer any but 1.0 and 1.1 themselves */
  readonly version?: string;
  /** how this server carries a WebSocket: its connection as bytes (Node), or messages its own WebSocket
   * reads and writes (Deno, Bun); null: it cannot, and the request goes on as a plain one */
  readonly upgrades: 'bytes' | 'messages' | null;
  /** the request body at its source (asked for once, and only when the head announces one) */
  body(): BodySource | null;
  /** runs `f` when the app goes away before its answer is written whole; the function returned takes it back */
  onGone(f: (reason: unknown) => void): () => void;
  /** whether its connection is closed now: a runtime's server may hand a request over before it has read the
   * close behind it. Looked at after a turn of the event loop (`ioTurn`), taken always (Deno, Bun, where it
   * costs nothing measurable) or only while the loop is behind (Node, where it costs 12–35 µs a request). */
  closed?(): boolean;
  /** when `closed` is looked at: after a turn of the event loop always, or only while the loop is behind */
  readonly turn?: 'always' | 'behind';
  /** What the server is to write: `reply`, its body passed on chunk by chunk and `done` told how that ended
   * (without `done`: an answer of the ambassador's own, written as it is). */
  respond(reply: Reply, done?: BodyDone, idleMs?: number): Response | Promise<Response>;
}

/** A request body where the runtime keeps it: the next chunk when asked (nothing is read ahead), and
 * what to do with the rest when it is not wanted. */
export interface BodySource {
  next(): Promise<IteratorResult<Uint8Array> | ReadableStreamReadResult<Uint8Array>>;
  cancel(reason: unknown): Promise<void>;
  /** the handler gave up on the body (it stalled, or the app left): Deno's server otherwise keeps the app's
   * connection, even one the app has closed, waiting for the rest of it */
  giveUp(reason: unknown): void;
}

/** Told once how a response body ended: the bytes passed on, and what went wrong if anything did. */
export type BodyDone = (bytes: number, error?: string) => void;

/** One answer, from the upstream or the ambassador's own: a web body (fetch), a Node stream (`nodeSend`), or
 * a whole body had at once (`textReply`, `arrivedWhole`). */
export interface Reply {
  status: number;
  statusText: string;
  headers: HeaderList;
  body: ReadableStream<Uint8Array> | null;
  node?: NodeReadable;
  /** the whole body, had at once: an answer of the ambassador's own (`textReply`), or on Bun a short body
   * that came with its head (`arrivedWhole`) */
  whole?: Uint8Array<ArrayBuffer>;
  /** the upstream switched to WebSocket (a 101 to the app's `Upgrade: websocket`): its connection */
  upgraded?: UpstreamTunnel;
  /** what the app's server is to run in place of a response body: the tunnel to that connection */
  tunnel?: Tunnel;
}

/** How one attempt reaches the upstream: `fetch` on Deno and Bun, `node:http` on Node (see `nodeSend`): the
 * endpoint's destination, the request's path and query, and `tls` the route's certificates. `cancel` ends
 * the attempt, before the response headers or after. */
export type Send = (to: Destination, pathAndQuery: string, init: {
  method: string;
  headers: HeaderList;
  body: Uint8Array | ReadableStream<Uint8Array> | null;
  cancel: Cancel;
  tls: TlsMaterial | null;
}) => Promise<Reply>;

export interface Clock {
  now(): number;
  random(): number;
}

// =========================================================================================================
// The request path, in the order a request lives: intake → early answers → route and admission → forward
// (its attempts, each under its timeout) → the reply. `handle` calls each step in turn; the policies they
// ask come after, in the sections below.
// =========================================================================================================

/** What every step shares: the configuration, each route's policies, how attempts reach the upstream,
 * the clock, where events go, and what is in flight. One per process (`createAmbassador`). */
interface Proxy {
  readonly config: Config;
  readonly routes: ReadonlyMap<string, RoutePolicies>;
  readonly send: Send;
  /** how a WebSocket handshake reaches the upstream (node:http's client, on every runtime) */
  readonly upgrade: Send;
  readonly clock: Clock;
  readonly events: Events;
  readonly log: Logger;
  /** what the bodies kept for replay may hold, all requests together */
  readonly replayMemory: ReplayMemory;
  /** requests not yet answered in full, by a number of their own (two may carry the same x-request-id) */
  readonly inFlight: Map<number, InFlight>;
  readonly uploads: Uploads;
  /** whether the process is near the memory limit it runs under (`MemoryGuard`) */
  readonly memory: MemoryGuard;
  /** places for requests in flight, every route together (PROCESS_MAX_IN_FLIGHT, `processPlaces`) */
  readonly places: ConcurrencyLimit;
  /** the WebSocket tunnels open now */
  readonly tunnels: Set<Tunnel>;
  draining: boolean;
  requests: number;
  /** until when (clock time) the event loop counts as behind (`Ambassador.loopLate`): until then a request
   * waits a turn of it before it is taken on (`ioTurn`) */
  behindUntil: number;
}

interface InFlight {
  id: string;
  method: string;
  path: string;
  started: number;
}

/** One request on its way to the upstream: what every step after the route was chosen works on. */
interface Call {
  readonly id: string;
  readonly method: string;
  /** the app's request headers, as it sent them */
  readonly appHeaders: HeaderList;
  /** what the upstream is asked for: the path (the route's prefix taken off when it says so) and the query */
  readonly pathAndQuery: string;
  readonly route: Route;
  readonly policies: RoutePolicies;
  /** the app's address, asked of the runtime when the headers are made (Bun: by the close check). A function,
   * not a getter: V8 builds an object literal with an accessor on a slow path that every later read of the
   * object pays for (20 µs a request on Node, measured A/B). */
  readonly peer: () => string | undefined;
  /** when the request arrived */
  readonly started: number;
  /** the app going away */
  readonly gone: Cancel;
  /** what the log and the metrics are told once it is done */
  readonly record: RequestRecord;
  /** a WebSocket handshake, and how the app's server carries its tunnel; null: a plain request */
  readonly upgrade: 'bytes' | 'messages' | null;
}

// --- Intake -----------------------------------------------------------------------------------------------

/** One request, from the runtime's server to the answer it writes. */
async function handle(p: Proxy, req: AppRequest): Promise<Response> {
  const started = p.clock.now();
  const { method, target, headers } = req;
  const given = headerValue(headers, 'x-request-id');
  const id = given !== null && SAFE_REQUEST_ID.test(given) ? given : crypto.randomUUID();
  const q = target.indexOf('?');
  const sentPath = q < 0 ? target : target.slice(0, q);
  const path = sentPath.startsWith('/') ? normalizePath(sentPath) : null;
  const host = headerValue(headers, 'host');
  const record: RequestRecord = {
    id,
    route: '',
    endpoint: null,
    method,
    path: path ?? sentPath,
    status: 0,
    attempts: 0,
    durationMs: 0,
    upstreamMs: null,
    bytesIn: 0,
    bytesOut: 0,
  };
  // RFC 9112 §9.6: an app that says it closes gets an answer that says so too, whatever the answer is,
  // so no server reads on past it (a request pipelined behind it is never served).
  const closes = appCloses(headers);

  const early = earlyAnswer(req, host, path);
  const route = early ? undefined : matchRoute(p.config.routes, host, path!);
  if (early || !route) {
    const answer = early ??
      { status: REJECTION_STATUS.no_route, reason: `no route for ${host ?? ''}${path}`, rejected: 'no_route' as const };
    const reply = textReply(answer.status, answer.status === 200 ? '' : `ambassador: ${answer.reason}\n`, id);
    if (answer.allow) reply.headers.push(['allow', ALLOW]);
    if (answer.close || closes) reply.headers.push(['connection', 'close']);
    p.events.requestDone({
      ...record,
      status: answer.status,
      durationMs: p.clock.now() - started,
      ...(answer.status === 200 ? {} : { error: answer.reason }),
      rejected: answer.rejected,
    });
    return req.respond(reply);
  }
  record.route = route.name;
  const upgrade = req.upgrades !== null && isWebSocketUpgrade(method, headers) ? req.upgrades : null;
  if (upgrade !== null) {
    record.websocket = true;
    if (p.draining) { // a tunnel would outlive the drain: the app is sent to another replica
      record.rejected = 'draining';
      record.status = REJECTION_STATUS.draining;
      record.error = 'draining: no new WebSocket tunnel is opened';
      record.durationMs = p.clock.now() - started;
      p.events.requestDone(record);
      return req.respond(closing(rejectionReply('draining', record.error, id, 1000)));
    }
  }
  const policies = p.routes.get(route.name)!;
  const pathAndQuery = (route.stripPrefix ? stripPrefix(path!, route.prefix) : path!) + (q < 0 ? '' : target.slice(q));

  const key = ++p.requests;
  p.inFlight.set(key, { id, method, path: record.path, started });
  const gone = new Cancel();
  const offGone = req.onGone((reason) => gone.abort(reason));
  let holding = false; // a place under the route's concurrency limit, given back when the response is done
  let holdingProcess = false; // and one of the process's (`processPlaces`)
  const finish = (bytesOut: number, error?: string) => {
    p.uploads.end(key);
    offGone();
    if (holding) policies.concurrency.release();
    if (holdingProcess) p.places.release();
    holding = holdingProcess = false;
    p.inFlight.delete(key);
    record.durationMs = p.clock.now() - started;
    record.bytesOut = bytesOut;
    if (error && !record.error) record.error = error;
    p.events.requestDone(record);
  };
  const call: Call = {
    id,
    method,
    appHeaders: headers,
    pathAndQuery,
    route,
    policies,
    peer: () => req.peer,
    started,
    gone,
    record,
    upgrade,
  };

  const body = requestBody(req, p.config.bodyIdleTimeoutMs, () => p.uploads.end(key), gone);
  if (body) p.uploads.add(key);
  try {
    // Behind (a process at its CPU limit, one stopped for a while), what waits to be read is mostly requests
    // their apps have left: read together with its connection's close, a request is known gone one turn of
    // the event loop later, and it gets no place and never reaches the upstream.
    if (req.turn === 'always' || (req.turn === 'behind' && p.behindUntil > started)) {
      await ioTurn();
      if (!gone.aborted && req.closed!()) gone.abort(appClosed());
    }
    let admission = admit(p, call);
    if (admission instanceof Promise) admission = await admission; // only a rate limit's wait or a queue
    holding = holdingProcess = admission === true;
    const reply = admission === true ? await forward(p, call, body) : admission;
    record.status = reply.status;
    // The process's place is kept to the end of a body whose length says it is long: that is where the
    // memory goes. A short body, one of unknown length (server-sent events, a stream that may last hours)
    // and a tunnel give it back with the head, so they never hold the place of a request still to come.
    if (holdingProcess && !longBody(reply)) (holdingProcess = false), p.places.release();
    if (reply.upgraded) return req.respond(openTunnel(p, call, reply, finish), finish);
    // Draining, the app opens a fresh connection for its next call; and an answer that came before the
    // app's body was all read leaves the rest of that body on the connection (RFC 9112 §9.6: close it).
    // A handshake Node's server handed over as a connection has no HTTP after it.
    if (closes || p.draining || p.uploads.has(key) || upgrade === 'bytes') reply.headers.push(['connection', 'close']);
    return req.respond(reply, finish, p.config.bodyIdleTimeoutMs);
  } catch (err) {
    if (err instanceof ClientError) {
      // The app's own request failed it (a body that stalled): its answer, and its connection closed,
      // since what is left of that body cannot be told from the next request.
      record.status = err.status;
      finish(0, err.message);
      return req.respond(closing(textReply(err.status, `ambassador: ${err.message}\n`, id)));
    }
    if (gone.aborted) {
      // 499 is the log's word for an app that went away, never a status to send: an app still there to read an
      // answer (one that half-closed its connection mid-body, which Deno's server keeps open) gets a 400.
      record.status = 499;
      finish(0, `client went away: ${describeFailure(err)}`);
      return req.respond(closing(textReply(400, 'ambassador: the request broke off before its end\n', id)));
    }
    // Anything else is an answer the runtime would not write: the app gets a 502, the process lives on.
    p.log('error', `unexpected error: ${describeFailure(err)}`, { id, route: route.name });
    record.status = 502;
    finish(0, `the upstream's answer could not be passed on: ${describeFailure(err)}`);
    return req.respond(closing(textReply(502, `ambassador: the upstream's answer could not be passed on\n`, id)));
  }
}

/** The upstream's 101 as the app's tunnel, which holds the request's place, and its entry in flight, until
 * it closes; `finish` is then told the bytes the upstream sent, and the record the rest. */
function openTunnel(p: Proxy, call: Call, reply: Reply, finish: BodyDone): Reply {
  const tunnel = new Tunnel(reply.upgraded!, p.config.bodyIdleTimeoutMs, (by, error) => {
    p.tunnels.delete(tunnel);
    call.record.bytesIn = tunnel.up;
    call.record.closedBy = by;
    finish(tunnel.down, error);
  });
  p.tunnels.add(tunnel);
  p.events.tunnelOpened({ id: call.id, route: call.route.name, endpoint: call.record.endpoint ?? '' });
  return { ...reply, tunnel };
}

/** Whether a reply has a body whose Content-Length says it is longer than what is read whole. */
function longBody(reply: Reply): boolean {
  return (reply.body !== null || reply.node !== undefined) && declaredLength(reply) > WHOLE_BODY_MAX;
}

/** The body length a reply's Content-Length gives; NaN without one (or with one that is not a number). */
function declaredLength(reply: Reply): number {
  return Number(headerValue(reply.headers, 'content-length') ?? NaN);
}

/** Whether the app's request says `Connection: close`. */
export function appCloses(headers: HeaderList): boolean {
  for (let i = 0; i < headers.length; i++) {
    if (headers[i][0] === 'connection' && /(^|,)\s*close\s*(,|$)/i.test(headers[i][1])) return true;
  }
  return false;
}

/** The app's request body as a stream, or null when its head announces none. Read only as fast as the
 * upstream takes it, and failing with a 408 once the app has sent nothing for `idleMs` (Envoy's stream idle
 * timeout covers both directions too), so a stalled upload cannot hold its place under the concurrency
 * limit. `done`: the whole body has arrived. */
function requestBody(
  req: AppRequest,
  idleMs: number,
  done: () => void,
  gone: Cancel,
): ReadableStream<Uint8Array> | null {
  if (headerValue(req.headers, 'transfer-encoding') === null && headerValue(req.headers, 'content-length') === null) {
    return null;
  }
  const source = req.body();
  return source && bodyStream(source, idleMs, done, gone);
}

// --- Early answers ----------------------------------------------------------------------------------------

/** An answer the ambassador gives itself, before any route: a refusal, or the 200 to `OPTIONS *`. */
type EarlyAnswer = { status: number; reason: string; allow?: boolean; close?: boolean; rejected?: Rejection };

/** A refusal after which the connection is closed: what is left of such a request cannot be trusted. */
const refused = (status: number, reason: string): EarlyAnswer => ({ status, reason, close: true });

const ALLOW = 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS';
/** A Host header: a name or an address, and a port up to 65535 (RFC 9110 §7.2, RFC 3986 §3.2.2). A port past
 * it names none: URL parsers refuse it (Deno's and Bun's servers too), where Node's lets it by. */
const HOST_HEADER =
  /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(:(\d{1,4}|[0-5]\d{4}|6[0-4]\d{3}|65[0-4]\d\d|655[0-2]\d|6553[0-5]))?$/;
const VISIBLE_ASCII = /^[\x21-\x7e]*$/;

/** Requests the ambassador answers itself rather than forward: it only ever talks to its upstreams, and
 * sends on only requests every runtime can carry exactly as they came. `path` is the normalized path, null
 * when it could not be. */
export function earlyAnswer(req: AppRequest, host: string | null, path: string | null): EarlyAnswer | undefined {
  const { method, target, headers } = req;
  // Methods are case-sensitive (RFC 9110 §9.1); a fetch would send `get` as GET and `trace` as TRACE.
  if (/[a-z]/.test(method)) {
    return refused(400, `method ${JSON.stringify(method)} is not forwarded: method names are case-sensitive`);
  }
  if (REFUSED_METHODS.has(method)) return { status: 405, reason: `method ${method} is not forwarded`, allow: true };
  // HTTP/2 never comes as an HTTP/1 request line (RFC 9113 §3.4); Node's parser takes `HTTP/2.0` in one.
  if (req.version !== undefined && req.version !== '1.1' && req.version !== '1.0') {
    return refused(505, `HTTP/${req.version} is not spoken here: HTTP/1.1 or 1.0 only`);
  }
  // OPTIONS * asks about the server itself (RFC 9110 §9.3.7): the ambassador answers for itself.
  if (target === '*') {
    return method === 'OPTIONS'
      ? { status: 200, reason: 'OPTIONS *', allow: true }
      : refused(400, 'the target * is only for OPTIONS');
  }
  let hosts = 0;
  let bytes = method.length + target.length + 12; // the request line
  let body = false;
  let codings = false;
  let framed = false; // a Transfer-Encoding
  for (let i = 0; i < headers.length; i++) {
    const name = headers[i][0], value = headers[i][1];
    bytes += name.length + value.length + 4;
    // RFC 9110 §5.5: a field value carries no control character but tab. Every server refuses the others
    // (hostile.test.ts holds each runtime to it), but Bun's lets DEL through, which would reach the upstream.
    // One character looked for (65 ns a request on Node) rather than a class by regex (270).
    if (value.includes('\x7f')) return refused(400, 'a header field value with a control character');
    if (name === 'host') hosts++;
    else if (name === 'transfer-encoding') {
      codings ||= body || !isChunked(value);
      body = framed = true;
    } else if (name === 'content-length' && value !== '0') body = true;
  }
  // The same limits on every runtime (Node's parser already holds the size): 431, before anything is read.
  if (headers.length > MAX_REQUEST_HEADERS) return refused(431, `more than ${MAX_REQUEST_HEADERS} header fields`);
  if (bytes > MAX_REQUEST_HEAD_BYTES) return refused(431, `a request head larger than ${MAX_REQUEST_HEAD_BYTES} bytes`);
  // RFC 9112 §3.2: a request with more than one Host, or one that is not a host, gets 400. Routing reads
  // one and the upstream might read another.
  if (hosts > 1) return refused(400, 'more than one Host header');
  // HTTP/1.0 may leave it out (§3.2), but Deno's and Bun's servers refuse such a request: so does Node's.
  if (hosts === 0) return refused(400, 'no Host header');
  if (host !== null && !HOST_HEADER.test(host)) return refused(400, 'a Host header that is not a host');
  // An absolute-form target (`GET http://other-host/ HTTP/1.1`) asks for a forward proxy: the target as sent
  // says so, or else the authority of the URL the server made differs from the Host header.
  const absolute = req.urlHost === undefined ? !target.startsWith('/') : !sameAuthority(req.urlHost, host);
  if (absolute) return refused(400, 'absolute-form request targets are refused: this is not a forward proxy');
  // RFC 9112 §3.2: a request target carries no fragment. A URL parser would drop it, and with it whatever
  // stood before it in the last segment (`/..#` is `..` once parsed): refused, never parsed.
  if (req.seen.includes('#')) return refused(400, 'a request target with a fragment (#)');
  // Only visible ASCII reaches a URL parser, which would drop tabs and line breaks and re-read what is left.
  // Node's parser refuses raw bytes that are not ASCII; Bun's server turns those that are not UTF-8 into
  // U+FFFD, so a target carrying one (%EF%BF%BD) lost bytes on the way in: refused on every runtime.
  if (!VISIBLE_ASCII.test(req.seen) || /%EF%BF%BD/i.test(req.seen)) {
    return refused(
      400,
      'a request target with bytes that are not visible ASCII, or that lost bytes on the way (U+FFFD)',
    );
  }
  if (path === null) return refused(400, 'a path whose dot segments hide behind encoded slashes or backslashes');
  // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (a 1.0 recipient reads no
  // chunking). Deno's and Bun's servers refuse one; Node's read it as chunked: refused there too.
  if (framed && req.version === '1.0') return refused(400, 'an HTTP/1.0 request with Transfer-Encoding');
  // RFC 9112 §6.1: a transfer coding the ambassador cannot apply is 501; only chunked framing is passed on.
  if (codings) return refused(501, 'transfer codings other than chunked are not forwarded');
  // A GET or HEAD body has no meaning (RFC 9110 §9.3.1) and not every client can send one: such a request
  // is refused whole, never sent on with framing headers that announce a body it does not carry.
  if (body && (method === 'GET' || method === 'HEAD')) {
    return refused(400, `a ${method} request with a body is not forwarded`);
  }
  return undefined;
}

/** The event loop is behind once a timer comes this late (a process at a 100m CPU limit is stopped for up to
 * 90 ms in every 100; one that keeps up on a core is late by a few ms), and counts as behind for a second
 * after. */
const LOOP_BEHIND_MS = 20;
const LOOP_BEHIND_HOLD_MS = 1000;

/** Settles once the runtime has read its sockets again since the first call of this turn: a connection whose
 * request was read with its close behind it has said so by then. One promise serves every request read in
 * the same turn. */
function ioTurn(): Promise<void> {
  return turn ??= new Promise((resolve) =>
    setImmediate(() => {
      turn = null; // a request read in the next turn waits for the one after
      setImmediate(resolve);
    })
  );
}
let turn: Promise<void> | null = null;

/** Why a request ends when its app's connection closed before its answer did (logged with the 499). */
const appClosed = () => new Error('the app closed its connection');

/** Whether a request URL's authority is the one its Host header names, as a URL would write it: the name
 * in lower case, the default port left out (RFC 9110 §4.2.3). Deno and Bun build the URL from the Host
 * header unless the target was absolute-form, which this tells apart. */
function sameAuthority(urlHost: string, host: string | null): boolean {
  if (urlHost === host) return true;
  if (host === null) return false;
  try {
    return new URL(`http://${host}`).host === urlHost;
  } catch {
    return false;
  }
}

// --- Route and admission ----------------------------------------------------------------------------------

/** The route's local rate limit, then its concurrency limit: true when the request may go on (holding a
 * place under the limit), else the 429 or 503 the app gets. A promise only when the request must wait
 * (for a token, or in the queue). Throws only when the app went away. */
function admit(p: Proxy, call: Call): true | Reply | Promise<true | Reply> {
  const { route, policies, gone, record } = call;
  if (gone.aborted) throw gone.reason;
  if (p.memory.shedding && p.places.active > 0) return shed(p.memory, call);
  if (policies.bucket) {
    const token = policies.bucket.take(p.clock.now(), route.rateLimitWaitMs);
    if (!token.ok) {
      record.rejected = 'rate_limit';
      record.error = `rate limit: over ${route.rateLimitPerSec}/s (burst ${route.rateLimitBurst}) to ${route.name}`;
      return rejectionReply('rate_limit', record.error, call.id, token.retryAfterMs);
    }
    if (token.waitMs > 0) {
      return sleep(token.waitMs, gone).then(() => {
        if (gone.aborted) throw gone.reason;
        return takePlace(p, call);
      });
    }
  }
  return takePlace(p, call);
}

/** Near the memory limit: no new stream is taken on while others are in flight, so the process never grows
 * into the limit the kernel kills it at (Envoy's overload manager does the same). The app is told to come back
 * in a second. With none in flight (`admit`: no request holds a place), there is no growth to stop — what is in
 * use then is what the runtime's allocator kept after a burst, or its own code, counted where the group cannot
 * be read, and waiting gives none of it back — so the one request is taken on: a process whose memory stays up
 * serves one request at a time, rather than answer 503 for ever while its liveness probe says all is well. */
function shed(memory: MemoryGuard, call: Call): Reply {
  const mib = (bytes: number) => Math.round(bytes / 1024 ** 2);
  call.record.rejected = 'memory';
  call.record.error = `memory: ${mib(memory.usedBytes)} MiB in use, past ${memory.percent}% of the ${
    mib(memory.limitBytes ?? 0)
  } MiB limit`;
  return rejectionReply('memory', call.record.error, call.id, 1000);
}

function takePlace(p: Proxy, call: Call): true | Reply | Promise<true | Reply> {
  const { concurrency } = call.policies;
  if (concurrency.acquire()) return takeProcessPlace(p, call);
  if (concurrency.full) return overloaded(call);
  return waitForPlace(call, concurrency, call.route.queueTimeoutMs, () => overloaded(call), noop).then((r) =>
    r === true ? takeProcessPlace(p, call) : r
  );
}

/** With the route's place held, one of the process's (PROCESS_MAX_IN_FLIGHT): waited for, in order, for what
 * is left of the request's REQUEST_TIMEOUT_MS (which would end it anyway). Without one, the route's place is
 * given back. */
function takeProcessPlace(p: Proxy, call: Call): true | Reply | Promise<true | Reply> {
  if (p.places.acquire()) return true;
  const giveBack = () => call.policies.concurrency.release();
  if (p.places.full) return giveBack(), overloadedProcess(p, call); // the queue has no size: never so
  const { requestTimeoutMs } = call.route;
  const left = requestTimeoutMs > 0 ? Math.max(0, call.started + requestTimeoutMs - p.clock.now()) : null;
  return waitForPlace(call, p.places, left, () => overloadedProcess(p, call), giveBack);
}

/** Waits in `limit`'s queue for a place, up to `timeoutMs` (null: no limit), or until the app goes away
 * (which rejects). True when the place is had; else `refused()`, and `giveUp()` runs whenever it is not had.
 * One promise and one timer a waiter: inside a pod's CPU limit a good share of requests wait here. */
function waitForPlace(
  call: Call,
  limit: ConcurrencyLimit,
  timeoutMs: number | null,
  refused: () => Reply,
  giveUp: () => void,
): Promise<true | Reply> {
  return new Promise((resolve, reject) => {
    let timer: Timer | undefined;
    let offGone = noop;
    // Each way out takes the others back at once (the grant runs inside another request's `release`), so
    // exactly one of them settles the wait.
    const leave = limit.wait(() => {
      clearTimer(timer);
      offGone();
      resolve(true);
    });
    if (timeoutMs !== null) {
      timer = setTimer(() => {
        offGone();
        leave();
        const answer = refused();
        giveUp();
        resolve(answer);
      }, timeoutMs);
    }
    offGone = call.gone.on((reason) => { // at once when the app has gone already
      clearTimer(timer);
      leave();
      giveUp();
      reject(reason);
    });
  });
}

function overloaded(call: Call): Reply {
  const { route, policies, record } = call;
  record.rejected = 'concurrency';
  record.error =
    `overloaded: ${route.maxInFlight} requests in flight to ${route.name} and ${policies.concurrency.queued} waiting`;
  return rejectionReply('concurrency', record.error, call.id, 1000);
}

function overloadedProcess(p: Proxy, call: Call): Reply {
  const { route, record } = call;
  record.rejected = 'concurrency';
  record.error = `overloaded: ${p.places.active} requests in flight in all (PROCESS_MAX_IN_FLIGHT) and ` +
    `${p.places.queued} waiting, and none came within REQUEST_TIMEOUT_MS (${route.requestTimeoutMs} ms)`;
  return rejectionReply('concurrency', record.error, call.id, 1000);
}

/** The most requests in flight in all (PROCESS_MAX_IN_FLIGHT) — from admission to the answer's head, and on to
 * the end of a body longer than 64 KiB by its Content-Length: as set, or, unset, the fewer of what the
 * memory and the CPU limits the process runs under allow, and at least 4; no limit without either.
 * - Memory: one place per 4 MiB — what a stream may hold at its peak on Bun, whose fetch reads a response
 *   ahead of its reader (on Node and Deno about half that). Inside 100m CPU and 128 MiB, 64 connections of
 *   1 MiB bodies held Bun's group at its limit until it stalled on its own code's pages, and 32 at a time
 *   did not.
 * - CPU: one place per 3 ms of CPU the limit gives a second (33 at 100m, 6 at 20m) — about what a body of
 *   1 MiB costs a runtime here inside such a limit, so a body that has its place is through in about a
 *   second. With more, every body in flight shares the CPU with all the others, each takes longer than its
 *   app waits, and at a fifth of 100m the apps got almost nothing until the load stopped. */
export function processPlaces(configured: number | null, limitBytes: number | null, cpuCores: number | null): number {
  if (configured !== null) return configured;
  const byMemory = limitBytes === null ? Infinity : Math.floor(limitBytes / (4 * 1024 * 1024));
  const byCpu = cpuCores === null ? Infinity : Math.floor((cpuCores * 1000) / 3);
  const places = Math.min(byMemory, byCpu);
  return places === Infinity ? 0 : Math.max(4, places);
}

// --- Forward ----------------------------------------------------------------------------------------------

/** The request's body made ready (kept for replay when small), then its attempts; a request without a
 * body goes straight to them. */
function forward(p: Proxy, call: Call, appBody: ReadableStream<Uint8Array> | null): Promise<Reply> {
  const readFrom = p.clock.now();
  return appBody === null ? attempts(p, call, NO_BODY, readFrom) : forwardWithBody(p, call, appBody, readFrom);
}

async function forwardWithBody(
  p: Proxy,
  call: Call,
  appBody: ReadableStream<Uint8Array>,
  readFrom: number,
): Promise<Reply> {
  const declared = headerValue(call.appHeaders, 'content-length');
  const body = await prepareBody(
    appBody,
    declared === null ? undefined : Number(declared),
    call.route.retryBodyMaxBytes,
    p.replayMemory,
    p.config.bodyIdleTimeoutMs,
  );
  try {
    return await attempts(p, call, body, readFrom);
  } finally {
    body.release();
  }
}

/** The attempts of one request: an endpoint each, retried as `decideRetry` says, within the request's
 * deadline. The time the app takes to send its body does not count against REQUEST_TIMEOUT_MS: the clock
 * stops from when the body began to be read (`readFrom`) until it was read whole (kept for replay) or sent
 * (streamed). */
async function attempts(p: Proxy, call: Call, body: ForwardBody, readFrom: number): Promise<Reply> {
  const { route, policies, gone, record, id, method } = call;
  const clock = p.clock;
  const idempotencyKey = headerValue(call.appHeaders, 'idempotency-key') !== null;
  const headers = forwardHeaders(call.appHeaders, id, call.peer());
  if (call.upgrade !== null) {
    // The handshake goes on with the app's Sec-WebSocket-* headers and its Upgrade; where the ambassador
    // reads the messages (Deno, Bun) no extension is offered, since it could not read frames one changed.
    if (call.upgrade === 'messages') {
      for (let i = headers.length - 1; i >= 0; i--) {
        if (headers[i][0] === 'sec-websocket-extensions') headers.splice(i, 1);
      }
    }
    headers.push(['connection', 'upgrade'], ['upgrade', 'websocket']);
  }
  const deadlineAfter = (
    bodyRead: number,
  ) => (route.requestTimeoutMs > 0 ? call.started + route.requestTimeoutMs + (bodyRead - readFrom) : Infinity);
  const begun = clock.now();
  let deadline = body.sent === null ? deadlineAfter(begun) : Infinity;
  if (body.sent !== null) void body.sent.then(() => (deadline = deadlineAfter(clock.now())));
  // Worked out when an attempt's timer starts: once the body has gone, when the deadline is known too.
  const limit = () => Math.min(route.tryTimeoutMs > 0 ? route.tryTimeoutMs : Infinity, deadline - clock.now());
  policies.budget.recordRequest(begun);
  let endpoints = policies.pool.current();
  if (endpoints instanceof Promise) endpoints = await endpoints; // only while a lookup must be waited for
  const all = endpoints;
  const tried = new Set<Endpoint>();
  /** The endpoints whose breaker lets a request through: the list itself while every one does. */
  const available = (
    now: number,
  ) => (all.every((e) => e.breaker.available(now)) ? all : all.filter((e) => e.breaker.available(now)));

  for (let n = 1;; n++) {
    const tryStarted = clock.now();
    const endpoint = pickEndpoint(available(tryStarted), tried, tryStarted, clock.random);
    if (!endpoint) { // only on the first attempt: a retry is decided below only when an endpoint is free
      const waitMs = Math.min(...all.map((e) => e.breaker.remainingMs(tryStarted)));
      record.rejected = 'circuit_open';
      record.error = `circuit open: ${
        all.length === 1 ? `${all[0].key} is` : `all ${all.length} endpoints are`
      } ejected`;
      return rejectionReply('circuit_open', record.error, id, waitMs);
    }
    tried.add(endpoint);
    record.attempts = n;
    record.endpoint = endpoint.key;
    const { res, failure, error, appFault } = await tryEndpoint(
      p,
      call,
      endpoint,
      n,
      { method, headers, body },
      limit,
      tryStarted,
    );
    if (gone.aborted) {
      if (res) discard(res);
      throw gone.reason;
    }
    if (appFault) throw appFault; // answered by `handle`, never retried
    record.bytesIn = body.bytes();
    if (res && !RETRYABLE_STATUS.has(res.status)) return appReply(res, method, id);

    const now = clock.now();
    const next = decideRetry({
      outcome: res ? { status: res.status } : { failure: failure! },
      method,
      idempotencyKey,
      attempt: n,
      maxAttempts: route.retryAttempts,
      bodyReplayable: body.replayable,
      budgetAvailable: policies.budget.canRetry(now),
      endpointAvailable: available(now).length > 0,
      retryAfterMs: res ? parseRetryAfter(headerValue(res.headers, 'retry-after'), Date.now()) : undefined,
      backoffMs: backoffDelay(n, route.retryBackoffMs, route.retryBackoffMaxMs, clock.random()),
      remainingMs: deadline - now,
    });
    p.events.attemptFailed({
      id,
      route: route.name,
      endpoint: endpoint.key,
      attempt: n,
      error: res ? `upstream answered ${res.status}` : error,
      kind: res ? 'status' : failure!,
      status: res?.status,
      next,
    });
    if (!next.retry) {
      if (res) return appReply(res, method, id); // the upstream's own last answer says more than ours would
      record.error = error;
      return failureReply(failure!, error, n, id);
    }
    policies.budget.recordRetry(now);
    if (res) discard(res); // frees the connection for the next attempt
    await sleep(next.delayMs, gone);
    if (gone.aborted) throw gone.reason;
  }
}

/** What one attempt came to: the upstream's answer, or why there was none (`appFault`: the app's own
 * request was at fault, which says nothing of the endpoint). */
interface Tried {
  res?: Reply;
  failure?: FailureKind;
  error: string;
  appFault?: ClientError;
}

/** One attempt at one endpoint, and what it says of that endpoint: its breaker, its latency average, its
 * failure penalty, and the events for the log and the metrics. */
async function tryEndpoint(
  p: Proxy,
  call: Call,
  endpoint: Endpoint,
  n: number,
  request: { method: string; headers: HeaderList; body: ForwardBody },
  limitMs: () => number,
  tryStarted: number,
): Promise<Tried> {
  const { route, policies, gone, record, id } = call;
  const probe = endpoint.breaker.admit(tryStarted);
  if (probe) p.events.endpointChanged({ route: route.name, endpoint: endpoint.key, change: 'probing' });
  const tried: Tried = { error: '' };
  endpoint.inFlight++;
  endpoint.requests++;
  try {
    const tls = policies.tls?.current((problem) => p.events.tlsReloaded({ route: route.name, error: problem })) ?? null;
    const res = await attempt(
      call.upgrade === null ? p.send : p.upgrade,
      endpoint.destination,
      call.pathAndQuery,
      { method: request.method, headers: request.headers, body: request.body.take(), tls },
      limitMs,
      gone,
      request.body,
    );
    if (res.upgraded) {
      const problem = await upgradeProblem(call.appHeaders, res.headers);
      if (problem) {
        drop(res);
        throw Object.assign(new Error(problem), { code: 'HPE_BAD_UPGRADE' });
      }
    } else if (res.status < 200 || res.status > 599) {
      // A 101 nobody asked for (the app's Upgrade is never sent on), another 1xx a client let through,
      // or no status at all (RFC 9110 §15: three digits, 1xx to 5xx): the connection is closed.
      drop(res);
      throw res.status === 101 ? unaskedUpgrade() : badStatus(res.status);
    }
    tried.res = res;
    record.upstreamMs = p.clock.now() - tryStarted;
    p.events.attemptResponded({
      id,
      route: route.name,
      endpoint: endpoint.key,
      attempt: n,
      status: res.status,
      seconds: record.upstreamMs / 1000,
    });
  } catch (err) {
    if (err instanceof ClientError) tried.appFault = err;
    tried.failure = classifyFailure(err);
    tried.error = tried.failure === 'timeout' ? `timeout: ${describeFailure(err)}` : describeFailure(err);
  } finally {
    endpoint.inFlight--;
  }
  const { res, appFault } = tried;
  const now = p.clock.now();
  if (res) updateEwma(endpoint, now - tryStarted, now);
  // Without a breaker, a failure costs in the balancer (`penaltyAt`).
  const failed = !gone.aborted && !appFault && (res === undefined || res.status >= 500);
  if (failed && route.breakerFailures === 0) endpoint.failedAt = now;
  // What this attempt says of the endpoint: an answer below 500 is health; 5xx, a refused or broken
  // connection and a timeout are failures; the app going away, or its request at fault, says nothing.
  const change = endpoint.breaker.record(
    now,
    gone.aborted || appFault ? undefined : res !== undefined && res.status < 500,
    probe,
  );
  if (change) {
    p.events.endpointChanged({
      route: route.name,
      endpoint: endpoint.key,
      change,
      ...(change === 'opened'
        ? { openMs: endpoint.breaker.remainingMs(now), ejections: endpoint.breaker.ejections }
        : {}),
    });
  }
  return tried;
}

/** One attempt: send until response headers arrive or `limitMs` passes, counted from when the body has
 * gone (`body.sent`; null: at once), or until the upstream stops taking a streamed body (`body.watch`).
 * The app going away ends it through the same cancellation, before the headers and after. The
 * cancellation settles the attempt whatever the client makes of it (a client that loses track of a request
 * after a stray 101 would otherwise hold its place forever); a reply that comes after it is let go. */
function attempt(
  send: Send,
  to: Destination,
  pathAndQuery: string,
  init: Omit<Parameters<Send>[2], 'cancel'>,
  limitMs: () => number,
  gone: Cancel,
  body: ForwardBody,
): Promise<Reply> {
  const cancel = new Cancel();
  const offGone = gone.on((reason) => cancel.abort(reason));
  body.watch((err) => cancel.abort(err));
  return new Promise<Reply>((resolve, reject) => {
    let settled = false;
    let timer: Timer | undefined;
    const offSelf = cancel.on((reason) => {
      if (settled) return;
      settled = true;
      clearTimer(timer);
      offGone();
      reject(reason);
    });
    if (settled) return;
    const startTimer = () => {
      const ms = limitMs();
      if (!settled && Number.isFinite(ms)) {
        timer = setTimer(
          () => cancel.abort(new TimeoutError(`no response headers within ${Math.round(ms)} ms`)),
          Math.max(0, ms),
        );
      }
    };
    if (body.sent === null) startTimer();
    else void body.sent.then(startTimer);
    send(to, pathAndQuery, { method: init.method, headers: init.headers, body: init.body, tls: init.tls, cancel }).then(
      (reply) => {
        if (settled) return discard(reply);
        settled = true;
        clearTimer(timer);
        offSelf(); // the app's going away still reaches the upstream while the body flows
        resolve(reply);
      },
      (err) => {
        if (settled) return;
        settled = true;
        clearTimer(timer);
        offGone();
        reject(err);
      },
    );
  });
}

// --- The reply --------------------------------------------------------------------------------------------

/** The upstream's answer as the app gets it: its headers shaped (`responseHeaders`), and no body where
 * the method or the status allows none. */
export function appReply(res: Reply, method: string, id: string): Reply {
  if (res.upgraded) {
    return {
      status: 101,
      statusText: '',
      headers: responseHeaders(res.headers, id),
      body: null,
      upgraded: res.upgraded,
    };
  }
  const noBody = method === 'HEAD' || NULL_BODY_STATUS.has(res.status);
  if (noBody) discard(res);
  const headers = responseHeaders(res.headers, id);
  // RFC 9110 §8.6: a 204 carries no Content-Length (a 304's and a HEAD's describe the representation).
  return {
    status: res.status,
    statusText: reasonPhrase(res.statusText),
    headers: res.status === 204 ? headers.filter(([name]) => name !== 'content-length') : headers,
    body: noBody ? null : res.body,
    node: noBody ? undefined : res.node,
    whole: noBody ? undefined : res.whole,
  };
}

// --- What the steps share: cancellation and timers --------------------------------------------------------

/** A request's or an attempt's cancellation: a flag, a reason, and what to do when it comes. The hot path
 * makes one or two per request, and an `AbortController` with its listeners is an EventTarget each; only
 * a fetch (Deno's, Bun's) needs a real `AbortSignal`, and `signalOf` makes it there. */
export class Cancel {
  aborted = false;
  reason: unknown = undefined;
  private callbacks: Array<(reason: unknown) => void> | null = null;

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason;
    const callbacks = this.callbacks;
    this.callbacks = null;
    if (callbacks) { for (const f of callbacks) f(reason); }
  }

  /** Runs `f` on cancellation (at once when it has come); the function returned takes `f` back. */
  on(f: (reason: unknown) => void): () => void {
    if (this.aborted) {
      f(this.reason);
      return noop;
    }
    (this.callbacks ??= []).push(f);
    return () => {
      const i = this.callbacks?.indexOf(f) ?? -1;
      if (i >= 0) this.callbacks!.splice(i, 1);
    };
  }
}

/** A timer of the request path (`setTimer`): what to run, and when, in its list. */
export interface Timer {
  at: number;
  run: (() => void) | null; // null once it has run or been cleared
  prev: Timer | null;
  next: Timer | null;
  list: TimerList;
}

/** The timers of one length, in the order they were set, which is the order they are due in, under one
 * runtime timer set for the first. */
interface TimerList {
  ms: number;
  first: Timer | null;
  last: Timer | null;
  armed: ReturnType<typeof setTimeout> | undefined;
}

const timerLists = new Map<number, TimerList>();

/** `setTimeout` for the timers a request sets and nearly always clears before they fire: an attempt's,
 * a body's idle rule, a wait in a queue. Deno's setTimeout makes a Node-style `Timeout` over timers of its
 * own, which cost the ambassador on Deno about 8 µs of CPU a request and on Node about 2 (measured A/B
 * against the same file with those timers off). Here setting one adds it to the end of its length's list
 * and clearing one unlinks it; the runtime timer of a list is set for its first, and when it fires it runs
 * every one due and is set again for what is left. A list's runtime timer set for one since cleared fires
 * early, finds nothing due, and waits again (`TIMER_LISTS_KEPT` for what becomes of an empty one). */
export function setTimer(run: () => void, ms: number): Timer {
  const length = Math.min(Math.max(Math.ceil(ms), 0), MAX_TIMER_MS);
  let list = timerLists.get(length);
  if (!list) timerLists.set(length, list = { ms: length, first: null, last: null, armed: undefined });
  const timer: Timer = { at: performance.now() + length, run, prev: list.last, next: null, list };
  if (list.last) list.last.next = timer;
  else list.first = timer;
  list.last = timer;
  list.armed ??= setTimeout(() => fireTimers(list), length);
  return timer;
}

/** `clearTimeout` for `setTimer`: the timer will not run (nothing happens if it has). */
export function clearTimer(timer: Timer | undefined): void {
  if (!timer || timer.run === null) return;
  timer.run = null;
  const list = timer.list;
  if (timer.prev) timer.prev.next = timer.next;
  else list.first = timer.next;
  if (timer.next) timer.next.prev = timer.prev;
  else list.last = timer.prev;
  timer.prev = timer.next = null;
  if (list.first === null && timerLists.size > TIMER_LISTS_KEPT) dropList(list);
}

/** How many lists are kept, runtime timer and all, once empty: the lengths a route's settings give are a
 * handful, and a list kept for the next timer of its length saves setting and clearing a runtime timer each
 * time (left set, it fires once, finds nothing, and waits for none). Past them, as when each wait for what is
 * left of a request's time has a length of its own, an empty list goes at once, runtime timer and all, or
 * runtime timers would pile up by the thousand under load. */
const TIMER_LISTS_KEPT = 32;

function dropList(list: TimerList): void {
  clearTimeout(list.armed);
  list.armed = undefined;
  if (timerLists.get(list.ms) === list) timerLists.delete(list.ms);
}

/** A list's runtime timer: runs the timers due (a millisecond early is due, as a runtime timer may fire
 * that early by the finer clock), then waits for the next, if there is one. */
function fireTimers(list: TimerList): void {
  list.armed = undefined;
  const now = performance.now() + 1;
  try {
    for (let t = list.first; t !== null && t.at <= now; t = list.first) {
      const run = t.run!;
      clearTimer(t);
      run();
    }
  } finally {
    // (A timer one of them set may have set the runtime timer for itself, later than the first now is.)
    if (list.first) {
      clearTimeout(list.armed);
      list.armed = setTimeout(() => fireTimers(list), Math.max(1, list.first.at - now + 1));
    } else if (timerLists.size > TIMER_LISTS_KEPT) dropList(list);
  }
}

/** Sleeps `ms`, or until `cancel` comes. */
function sleep(ms: number, cancel: Cancel): Promise<void> {
  if (cancel.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimer(() => {
      off();
      resolve();
    }, ms);
    const off = cancel.on(() => {
      clearTimer(timer);
      resolve();
    });
  });
}

/** `work`, or what `late` makes of it (its value, or what it throws) once `ms` have passed first; the timer
 * is cleared either way. */
function raceTimer<T, U>(work: Promise<T>, ms: number, late: () => U): Promise<T | U> {
  let timer: Timer | undefined;
  const lateness = new Promise<U>((resolve, reject) => {
    timer = setTimer(() => {
      try {
        resolve(late());
      } catch (err) {
        reject(err);
      }
    }, ms);
  });
  return Promise.race([work, lateness]).finally(() => clearTimer(timer));
}

/** Read once: `performance.timeOrigin` is a getter into the runtime on every call, and the clock is read about ten
 * times a request. */
const TIME_ORIGIN = performance.timeOrigin;
const systemClock: Clock = { now: () => TIME_ORIGIN + performance.now(), random: Math.random };

// =========================================================================================================
// The ambassador put together: the proxy app (HOST:PORT) over the request path, the admin app
// (ADMIN_HOST:ADMIN_PORT), and each route's policies. main hands it the runtime.
// =========================================================================================================

/** What the ambassador needs of its runtime (see `Runtime`): its upstream client, resolver, files and TLS
 * stack, and its process figures for the metrics. */
export type AmbassadorRuntime = Pick<
  Runtime,
  'name' | 'send' | 'upgrade' | 'resolve' | 'readFile' | 'checkTls' | 'tlsByAddress' | 'usage'
>;

export interface Ambassador {
  /** The proxy app (listens on HOST:PORT): each runtime's server hands it the request as an `AppRequest`. */
  proxy: Hono<{ Bindings: AppRequest }>;
  /** The admin app (listens on ADMIN_HOST:ADMIN_PORT). */
  admin: Hono<{ Bindings: AdminPeer }>;
  /** Requests not yet answered in full, by a number of their own. */
  inFlight: Map<number, InFlight>;
  metrics: Metrics;
  markReady(): void;
  startDrain(): void;
  /** the drain's grace is over: every open WebSocket tunnel is closed with 1001 Going Away */
  closeTunnels(): void;
  /** settles once no request body is still arriving */
  uploadsRead(): Promise<void>;
  /** what `POST /shutdown` on the admin port does (main: start the drain) */
  onShutdownRequest(f: () => void): void;
  /** main's timer came `lateMs` late: the event loop's lag, for the metrics, and whether it is behind */
  loopLate(lateMs: number): void;
  readonly draining: boolean;
}

/** What the admin listener tells the admin app of a request: who sent it. */
export interface AdminPeer {
  peer?: string;
}

export function createAmbassador(
  config: Config,
  runtime: AmbassadorRuntime,
  options: {
    log?: Logger;
    clock?: Clock;
    metrics?: Metrics;
    /** the memory the process runs under, and what counts against it (`Runtime.memory`): new requests get
     * 503 near the limit */
    memory?: { limitBytes: number | null; used(): number };
    /** the CPU limit it runs under, in cores (`Runtime.cpu`): with the memory limit, it sizes the places for
     * requests in flight (`processPlaces`) */
    cpuCores?: number | null;
  } = {},
): Ambassador {
  const log = options.log ?? createLogger(config.logFormat, config.logLevel);
  const clock = options.clock ?? systemClock;
  const metrics = options.metrics ??
    new Metrics({ version: VERSION, runtime: runtime.name, startTimeSeconds: Date.now() / 1000 });
  const events = fanOut(logEvents(log, config.logLevel), metrics.events());
  const p: Proxy = {
    config,
    routes: routePolicies(config, clock, events, runtime),
    send: runtime.send,
    upgrade: runtime.upgrade,
    clock,
    events,
    log,
    replayMemory: new ReplayMemory(config.replayMemoryBytes),
    inFlight: new Map(),
    uploads: new Uploads(),
    memory: new MemoryGuard(options.memory?.limitBytes ?? null, config.memoryShedPercent),
    places: new ConcurrencyLimit(
      processPlaces(config.processMaxInFlight, options.memory?.limitBytes ?? null, options.cpuCores ?? null),
      Infinity,
      config.queueNewestFirstMs,
      () => clock.now(),
    ),
    tunnels: new Set(),
    draining: false,
    requests: 0,
    behindUntil: 0,
  };
  let ready = false;
  let shutdownRequested = noop;
  const proxy = new Hono<{ Bindings: AppRequest }>();
  proxy.all('*', (c) => handle(p, c.env));
  proxy.onError((err, c) => {
    log('error', `unexpected error: ${describeFailure(err)}`, { path: c.req.path });
    return c.env.respond(textReply(500, 'ambassador: internal error\n', crypto.randomUUID()));
  });
  const admin = createAdmin(
    metrics,
    () => (p.draining ? 'draining' : ready ? 'ready' : 'starting'),
    () => shutdownRequested(),
  );
  metrics.gauges = {
    ...metrics.gauges,
    inFlight: () => p.inFlight.size,
    draining: () => p.draining,
    upstreams: () =>
      [...p.routes.values()].map((r) => ({
        route: r.route.name,
        active: r.concurrency.active,
        queued: r.concurrency.queued,
        endpoints: r.pool.endpoints,
      })),
    now: () => clock.now(),
    replayBytes: () => p.replayMemory.held,
    usage: runtime.usage,
    memory: () => ({ limitBytes: p.memory.limitBytes, shedding: p.memory.shedding }),
    places: () => ({
      max: p.places.max,
      active: p.places.active,
      queued: p.places.queued,
      cpuCores: options.cpuCores ?? null,
    }),
  };
  // What counts against the limit is main's to say: the group's anonymous memory, or the resident size.
  if (options.memory) {
    p.memory.watch(options.memory.used, (shedding) => {
      const { usedBytes, limitBytes, percent } = p.memory;
      events.memoryPressure({ shedding, usedBytes, limitBytes: limitBytes!, percent });
    });
  }
  return {
    proxy,
    admin,
    inFlight: p.inFlight,
    metrics,
    markReady: () => void (ready = true),
    startDrain: () => void (p.draining = true),
    closeTunnels: () => [...p.tunnels].forEach((t) => t.goAway('drain')),
    uploadsRead: () => p.uploads.read(),
    onShutdownRequest: (f) => void (shutdownRequested = f),
    loopLate: (lateMs) => {
      metrics.eventLoopLagSeconds = lateMs / 1000;
      if (lateMs > LOOP_BEHIND_MS) p.behindUntil = clock.now() + LOOP_BEHIND_HOLD_MS;
    },
    get draining() {
      return p.draining;
    },
  };
}

/** The admin app (ADMIN_HOST:ADMIN_PORT): liveness, readiness, metrics, and `POST /shutdown`. */
function createAdmin(
  metrics: Metrics,
  status: () => 'starting' | 'ready' | 'draining',
  shutdown: () => void,
): Hono<{ Bindings: AdminPeer }> {
  const admin = new Hono<{ Bindings: AdminPeer }>();
  admin.get('/healthz', (c) => c.text('ok\n'));
  admin.get('/readyz', (c) => {
    const now = status();
    return now === 'ready' ? c.text('ready\n') : c.text(`${now}\n`, 503);
  });
  admin.get('/metrics', (c) => {
    const openMetrics = (c.req.header('accept') ?? '').includes('application/openmetrics-text');
    return c.body(metrics.render(openMetrics), 200, {
      'content-type': openMetrics
        ? 'application/openmetrics-text; version=1.0.0; charset=utf-8'
        : 'text/plain; version=0.0.4; charset=utf-8',
    });
  });
  // A Job's main container, on a cluster without native sidecars, ends its pod by asking the sidecar to
  // drain. Only from inside the pod: the admin port is reachable from outside for the kubelet's probes.
  admin.post('/shutdown', (c) => {
    const peer = c.env?.peer ?? '';
    if (!/^(127\.|::1$|::ffff:127\.)/.test(peer)) {
      return c.text('ambassador: /shutdown is for loopback clients only\n', 403);
    }
    shutdown();
    return c.text('draining\n', 202);
  });
  return admin;
}

/** Everything one route needs at run time beside its settings: the state of its policies. */
interface RoutePolicies {
  route: Route;
  budget: RetryBudget;
  concurrency: ConcurrencyLimit;
  bucket: TokenBucket | null;
  pool: EndpointPool;
  tls: TlsSource | null;
}

/** Each route's policies, made once at start. */
function routePolicies(
  config: Config,
  clock: Clock,
  events: Events,
  runtime: AmbassadorRuntime,
): Map<string, RoutePolicies> {
  const routes = new Map<string, RoutePolicies>();
  for (const route of config.routes) {
    routes.set(route.name, {
      route,
      budget: new RetryBudget(route.retryBudgetPercent, route.retryBudgetMinPerSec),
      concurrency: new ConcurrencyLimit(
        route.maxInFlight,
        route.queueSize,
        config.queueNewestFirstMs,
        () => clock.now(),
      ),
      bucket: route.rateLimitPerSec > 0
        ? new TokenBucket(route.rateLimitPerSec, route.rateLimitBurst, clock.now())
        : null,
      pool: new EndpointPool(
        route,
        clock,
        runtime.resolve,
        runtime.tlsByAddress,
        (e) => events.endpointsChanged({ route: route.name, ...e }),
      ),
      tls: route.tls ? new TlsSource(route.tls, runtime.readFile, clock, runtime.checkTls) : null,
    });
  }
  return routes;
}

/** Requests whose body is still arriving (Deno's server cuts such bodies off when it shuts down, so the
 * drain waits for them), and who waits for there to be none. */
class Uploads {
  private readonly open = new Set<number>();
  private waiting: Array<() => void> = [];

  add(key: number): void {
    this.open.add(key);
  }

  has(key: number): boolean {
    return this.open.has(key);
  }

  end(key: number): void {
    if (this.open.delete(key) && this.open.size === 0) { for (const f of this.waiting.splice(0)) f(); }
  }

  /** Settles once no request body is still arriving. */
  read(): Promise<void> {
    return this.open.size === 0 ? Promise.resolve() : new Promise<void>((r) => this.waiting.push(r));
  }
}

/** How often the resident memory is looked at, while a memory limit is known. */
const MEMORY_CHECK_MS = 100;

/** Whether the process is near the memory limit it runs under: past `percent` of it, new requests get 503
 * (`shed`) until it is back below. Looked at every MEMORY_CHECK_MS rather than per request; a limit of null
 * (none found) or a percent of 0 never sheds. */
export class MemoryGuard {
  shedding = false;
  usedBytes = 0;
  readonly limitBytes: number | null;
  readonly percent: number;
  private readonly threshold: number;

  constructor(limitBytes: number | null, percent: number) {
    this.limitBytes = limitBytes;
    this.percent = percent;
    this.threshold = limitBytes === null || percent === 0 ? Infinity : (limitBytes * percent) / 100;
  }

  /** Takes a new reading; tells `changed` when that starts or ends the shedding. */
  update(usedBytes: number, changed: (shedding: boolean) => void): void {
    this.usedBytes = usedBytes;
    const shedding = usedBytes >= this.threshold;
    if (shedding !== this.shedding) (this.shedding = shedding), changed(shedding);
  }

  /** Reads `used` every MEMORY_CHECK_MS while there is a threshold to cross; a reading that fails (the group's
   * files gone) keeps the last one. */
  watch(used: () => number, changed: (shedding: boolean) => void): void {
    if (this.threshold === Infinity) return;
    const look = () => {
      try {
        this.update(used(), changed);
      } catch { /* the last reading stands */ }
    };
    look();
    setInterval(look, MEMORY_CHECK_MS);
  }
}

// =========================================================================================================
// Policies: what the request path asks at each step. Pure: no I/O, no clock, no randomness of their
// own — `now` and `random` come in as arguments.
// =========================================================================================================

// --- Retry -----------------------------------------------------------------------------------------------

/** Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff and Jitter"):
 * a random delay in [0, min(cap, base·2^(retry-1))). Spreads the retries of many clients apart. */
export function backoffDelay(retry: number, baseMs: number, capMs: number, random: number): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, retry - 1));
  return Math.floor(random * ceiling);
}

/** Retry-After (RFC 9110 §10.2.3) as a delay in ms: delta-seconds or an HTTP-date. `undefined` when
 * absent or unreadable, so the caller falls back to its own backoff. */
export function parseRetryAfter(value: string | null, nowMs: number): number | undefined {
  if (value === null) return undefined;
  const v = value.trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  // All three HTTP-date forms start with a day name; Date.parse alone would take "-1" for a year.
  const date = /^[A-Za-z]{3}/.test(v) ? Date.parse(v) : NaN;
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - nowMs);
}

/** May a request with this method be sent again after this outcome? Unsafe methods are repeated only
 * when the upstream cannot have received them, so a POST is never duplicated (Envoy and nginx users have
 * seen POSTs run several times after a timeout). An `Idempotency-Key` makes any method repeatable. */
export function isRetryableOutcome(outcome: AttemptOutcome, method: string, idempotencyKey: boolean): boolean {
  if (!worthRetrying(outcome)) return false;
  const neverReached = 'failure' in outcome && (outcome.failure === 'refused' || outcome.failure === 'dns');
  return neverReached || IDEMPOTENT.has(method) || idempotencyKey;
}

/** Could another attempt fare better, whatever the method? Not after a TLS failure (a second handshake
 * meets the same certificate) or an error we cannot name, nor after a status other than 502/503/504. */
function worthRetrying(outcome: AttemptOutcome): boolean {
  if ('status' in outcome) return RETRYABLE_STATUS.has(outcome.status);
  return outcome.failure !== 'tls' && outcome.failure !== 'other';
}

export interface RetryInput {
  outcome: AttemptOutcome;
  method: string;
  idempotencyKey: boolean;
  attempt: number; // the attempt that just ended, from 1
  maxAttempts: number;
  bodyReplayable: boolean;
  budgetAvailable: boolean;
  endpointAvailable: boolean; // an endpoint whose breaker lets a request through
  retryAfterMs: number | undefined;
  backoffMs: number;
  remainingMs: number; // until the request's deadline; Infinity when there is none
}

/** The least time left before the deadline that a retry is sent with. */
const MIN_TRY_MS = 10;
/** The longest a retry waits, whatever Retry-After asks and even without a deadline (Linkerd's cap): an
 * upstream that asks for longer gets no retry, and the app gets its answer, Retry-After and all. */
export const MAX_RETRY_WAIT_MS = 300_000;

/** The whole retry decision in one place. The order matters for what is reported: a request that was not
 * retryable anyway is `final`; one that would have been retried says what stopped it. */
export function decideRetry(i: RetryInput): RetryDecision {
  if (!worthRetrying(i.outcome)) return { retry: false, reason: 'final' };
  if (i.attempt >= i.maxAttempts) return { retry: false, reason: 'attempts' };
  if (!isRetryableOutcome(i.outcome, i.method, i.idempotencyKey)) return { retry: false, reason: 'method' };
  if (!i.bodyReplayable) return { retry: false, reason: 'body' };
  // Retry-After is the upstream telling us when it can take the request again: honour it when it fits.
  const delayMs = i.retryAfterMs ?? i.backoffMs;
  // A try needs some time of its own: timers fire a millisecond or so off the clock (Bun's early), and a
  // retry sent with nothing left would reach the upstream only to be cut off at once.
  if (delayMs + MIN_TRY_MS > Math.min(i.remainingMs, MAX_RETRY_WAIT_MS)) return { retry: false, reason: 'deadline' };
  if (!i.budgetAvailable) return { retry: false, reason: 'budget' };
  if (!i.endpointAvailable) return { retry: false, reason: 'circuit' };
  return { retry: true, delayMs };
}

/** A retry budget (after Linkerd's and Envoy's): retries may be at most `percent` of the requests of the
 * last ten seconds, plus `minPerSec` per second, so a dead upstream never sees 3× its normal load
 * (envoy#9069 is the retry storm this prevents). Counts live in one-second buckets; `now` is passed in. */
export class RetryBudget {
  private readonly requests = new Array<number>(BUDGET_WINDOW_SECONDS).fill(0);
  private readonly retries = new Array<number>(BUDGET_WINDOW_SECONDS).fill(0);
  private second = 0;

  private readonly percent: number;
  private readonly minPerSec: number;

  constructor(percent: number, minPerSec: number) {
    this.percent = percent;
    this.minPerSec = minPerSec;
  }

  private advance(nowMs: number): number {
    const s = Math.floor(nowMs / 1000);
    if (s - this.second >= BUDGET_WINDOW_SECONDS) {
      this.requests.fill(0);
      this.retries.fill(0);
    } else {
      for (let t = this.second + 1; t <= s; t++) {
        this.requests[t % BUDGET_WINDOW_SECONDS] = 0;
        this.retries[t % BUDGET_WINDOW_SECONDS] = 0;
      }
    }
    if (s > this.second) this.second = s;
    return this.second % BUDGET_WINDOW_SECONDS;
  }

  recordRequest(nowMs: number): void {
    this.requests[this.advance(nowMs)]++;
  }

  canRetry(nowMs: number): boolean {
    this.advance(nowMs);
    const requests = this.requests.reduce((a, b) => a + b, 0);
    const retries = this.retries.reduce((a, b) => a + b, 0);
    const allowed = (requests * this.percent) / 100 + this.minPerSec * BUDGET_WINDOW_SECONDS;
    return retries + 1 <= allowed;
  }

  recordRetry(nowMs: number): void {
    this.retries[this.advance(nowMs)]++;
  }
}

/** Names the failure behind a failed attempt, whichever client failed: Node's errors carry a system error
 * code (in `cause` when wrapped), Deno's fetch says it in the message, Bun's in its `code`. All are read, so
 * the same kinds come out on every runtime. */
export function classifyFailure(err: unknown): FailureKind {
  const parts: string[] = [];
  for (let e: unknown = err, depth = 0; e && depth < 5; e = (e as { cause?: unknown }).cause, depth++) {
    const { code, name, message } = e as { code?: unknown; name?: unknown; message?: unknown };
    parts.push(String(code ?? ''), String(name ?? ''), String(message ?? e));
  }
  const text = parts.join(' ');
  if (/TimeoutError|UND_ERR_CONNECT_TIMEOUT|UND_ERR_HEADERS_TIMEOUT|ETIMEDOUT/i.test(text)) return 'timeout';
  if (/ECONNREFUSED|Connection refused|EHOSTUNREACH|ENETUNREACH/i.test(text)) return 'refused';
  if (/ENOTFOUND|EAI_AGAIN|dns error|failed to lookup address/i.test(text)) return 'dns';
  if (/CERT|certificate|SSL|TLS|handshake/i.test(text)) return 'tls';
  if (
    /ECONNRESET|EPIPE|UND_ERR_SOCKET|other side closed|connection reset|connection closed|broken pipe|closed before/i
      .test(text)
  ) return 'reset';
  if (/HPE_|UND_ERR_INFO|invalid HTTP|parse|UND_ERR_HEADERS_OVERFLOW|Malformed_HTTP/i.test(text)) return 'protocol';
  return 'other';
}

/** One short line for logs and error bodies, in the spirit of Go's `dial tcp: connection refused`. A URL
 * in an error's text is cut to its origin: its path and query are the app's, and may carry secrets. */
export function describeFailure(err: unknown): string {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause ??
    (err as { code?: string; message?: string });
  let text: string;
  if (cause?.code && cause.message) {
    text = cause.message.includes(cause.code) ? cause.message : `${cause.code} ${cause.message}`;
  } else if (cause?.message) text = cause.message;
  else text = err instanceof Error ? err.message : String(err);
  return text.replace(/\b(https?:\/\/[^/\s?#)]*)[^\s)]*/gi, '$1');
}

// --- Breaker and balancing -------------------------------------------------------------------------------

/** A circuit breaker for one endpoint (outlier ejection, in Envoy's words). After `failures` failures in a
 * row it opens: the endpoint gets nothing for `openMs`, doubled on each ejection that follows closely on
 * the last, up to `openMaxMs`. Then it is half-open: at most `probes` requests at once may try it — never
 * a burst (one half-open breaker letting everything through caused a 17× load spike) — and the first
 * answer closes it again or opens it for longer. No timers: open → half-open is worked out when read. */
export class Breaker {
  private failures = 0;
  private openedAt = -Infinity;
  private openMs = 0;
  private isOpen = false;
  private probing = 0;
  private lastOpenedAt = -Infinity;
  /** ejections that followed one another closely: the next open period is `openMs · 2^(ejections-1)` */
  ejections = 0;
  /** every ejection since start, for the metrics */
  ejectionsTotal = 0;

  private readonly p: { failures: number; openMs: number; openMaxMs: number; probes: number };

  constructor(p: { failures: number; openMs: number; openMaxMs: number; probes: number }) {
    this.p = p;
  }

  state(now: number): BreakerState {
    if (!this.isOpen) return 'closed';
    return now < this.openedAt + this.openMs ? 'open' : 'half-open';
  }

  /** May a request go to this endpoint now? */
  available(now: number): boolean {
    const state = this.state(now);
    return state === 'closed' || (state === 'half-open' && this.probing < this.p.probes);
  }

  /** A request goes to this endpoint: returns whether it is a probe, whose answer decides the state. */
  admit(now: number): boolean {
    if (this.state(now) !== 'half-open') return false;
    this.probing++;
    return true;
  }

  /** An attempt sent at `admit` ended: `ok` true or false, or undefined when it came to nothing (the app
   * went away) and counts neither way. Returns the change it caused, for the log and the metrics. */
  record(now: number, ok: boolean | undefined, probe: boolean): BreakerChange {
    if (probe) this.probing = Math.max(0, this.probing - 1);
    if (ok === undefined || this.p.failures === 0) return undefined;
    if (this.isOpen) {
      // Only a probe's answer counts: requests admitted before the breaker opened say nothing new.
      if (!probe) return undefined;
      if (ok) {
        this.isOpen = false;
        this.failures = 0;
        return 'closed';
      }
      return this.open(now);
    }
    if (ok) {
      this.failures = 0;
      return undefined;
    }
    return ++this.failures >= this.p.failures ? this.open(now) : undefined;
  }

  private open(now: number): BreakerChange {
    // An endpoint that stayed healthy for a whole maximum period starts again from the shortest one.
    if (now - this.lastOpenedAt > 2 * this.p.openMaxMs) this.ejections = 0;
    this.ejections++;
    this.ejectionsTotal++;
    this.isOpen = true;
    this.openedAt = this.lastOpenedAt = now;
    this.openMs = Math.min(this.p.openMaxMs, this.p.openMs * 2 ** (this.ejections - 1));
    this.probing = 0;
    this.failures = 0;
    return 'opened';
  }

  /** How long until it may be tried again: 0 unless open. */
  remainingMs(now: number): number {
    return this.state(now) === 'open' ? this.openedAt + this.openMs - now : 0;
  }
}

export type BreakerState = 'closed' | 'open' | 'half-open';
export type BreakerChange = 'opened' | 'closed' | undefined;

/** What the balancer needs to know of an endpoint. */
export interface Balanced {
  inFlight: number;
  /** peak-sensitive moving average of response time, in ms (Linkerd's PeakEWMA), as of `lastSampleAt` */
  ewmaMs: number;
  lastSampleAt: number;
  /** when an attempt last failed here, for the failure penalty (`penaltyAt`); absent: never, or not counted */
  failedAt?: number;
}

/** Power of two choices (Mitzenmacher): two endpoints at random, the less loaded wins. The load is the
 * latency average times the requests in flight plus one (as Linkerd and Finagle weigh it), so a slow or
 * busy endpoint gets less without a herd piling onto the single best one. Endpoints in `avoid` (already
 * tried by this request) are passed over while any other is left. */
export function pickEndpoint<E extends Balanced>(
  candidates: readonly E[],
  avoid: ReadonlySet<E>,
  now: number,
  random: () => number,
): E | undefined {
  if (candidates.length <= 1) return candidates[0];
  const fresh = candidates.filter((e) => !avoid.has(e));
  const from = fresh.length > 0 ? fresh : candidates;
  if (from.length <= 1) return from[0];
  const i = Math.floor(random() * from.length);
  let j = Math.floor(random() * (from.length - 1));
  if (j >= i) j++;
  const cost = (e: E) => (ewmaAt(e, now) + penaltyAt(e, now) + 1) * (e.inFlight + 1);
  return cost(from[j]) < cost(from[i]) ? from[j] : from[i];
}

/** A failed attempt (refused, reset, timed out, a 5xx) weighs as a response this slow (Finagle's and
 * Linkerd's failure penalty), fading with FAILURE_DECAY_MS: a refusing endpoint answers fastest of all and
 * would otherwise win every pick. It fades fast (against a 1 ms endpoint it is tried again within about six
 * seconds), so one that is back is soon used again. Counted only where no breaker acts on failures: a
 * breaker ejects a failing endpoint within its first few failures and decides by probes when it is back,
 * and a penalty on top would keep from it the failures it counts and the probes that re-admit it. */
const FAILURE_PENALTY_MS = 1000;
const FAILURE_DECAY_MS = 1000;

export function penaltyAt(e: Balanced, now: number): number {
  return e.failedAt === undefined
    ? 0
    : FAILURE_PENALTY_MS * Math.exp(-Math.max(0, now - e.failedAt) / FAILURE_DECAY_MS);
}

/** EWMA decay time (Linkerd's default): a sample this old weighs 1/e of a fresh one. */
const EWMA_DECAY_MS = 10_000;

/** The average now: it decays toward zero while no sample comes, so an endpoint once slow (and so no
 * longer chosen) is tried again in time rather than written off for good. */
export function ewmaAt(e: Balanced, now: number): number {
  return e.ewmaMs * Math.exp(-Math.max(0, now - e.lastSampleAt) / EWMA_DECAY_MS);
}

/** Folds one response time into an endpoint's average. A slower sample is taken at once (a slow endpoint
 * is avoided straight away); a faster one pulls the average down in proportion to the time since the
 * last sample. */
export function updateEwma(e: Balanced, sampleMs: number, now: number): void {
  const w = Math.exp(-Math.max(0, now - e.lastSampleAt) / EWMA_DECAY_MS);
  e.ewmaMs = sampleMs > e.ewmaMs ? sampleMs : e.ewmaMs * w + sampleMs * (1 - w);
  e.lastSampleAt = now;
}

// --- Limits ----------------------------------------------------------------------------------------------

/** A token bucket: `ratePerSec` tokens a second, at most `burst` saved up. `take` answers at once, or
 * after a wait of at most `maxWaitMs` (the token is reserved, so waiters are served in order and the rate
 * holds exactly), or not at all, with how long until a token would be free. */
export class TokenBucket {
  private tokens: number;
  private at: number;

  private readonly ratePerSec: number;
  private readonly burst: number;

  constructor(ratePerSec: number, burst: number, now: number) {
    this.ratePerSec = ratePerSec;
    this.burst = burst;
    this.tokens = burst;
    this.at = now;
  }

  take(now: number, maxWaitMs: number): { ok: true; waitMs: number } | { ok: false; retryAfterMs: number } {
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) * this.ratePerSec) / 1000);
    this.at = now;
    if (this.tokens >= 1) {
      this.tokens--;
      return { ok: true, waitMs: 0 };
    }
    const waitMs = Math.ceil(((1 - this.tokens) * 1000) / this.ratePerSec);
    if (waitMs > maxWaitMs) return { ok: false, retryAfterMs: waitMs };
    this.tokens--;
    return { ok: true, waitMs };
  }
}

/** A request waiting for a place: told by `granted`, since when (for `newestFirstMs`). */
type Waiter = { granted: () => void; since: number };

/** At most `max` requests in flight to an upstream (0: no limit); the next `queueSize` wait for a free
 * place (in order, until the queue stands: `release`), the rest are refused at once. A slow dependency then
 * costs the app a quick 503, not a pile of requests that all time out together. */
export class ConcurrencyLimit {
  active = 0;
  private readonly waiting: Waiter[] = [];
  /** Places passed on and not yet told (`release`). */
  private handing: Waiter[] = [];

  readonly max: number;
  private readonly queueSize: number;
  /** once the longest waiter has waited this long, the newest goes first; 0: always in order */
  private readonly newestFirstMs: number;
  private readonly now: () => number;

  constructor(max: number, queueSize: number, newestFirstMs = 0, now: () => number = () => performance.now()) {
    this.max = max;
    this.queueSize = queueSize;
    this.newestFirstMs = newestFirstMs;
    this.now = now;
  }

  get queued(): number {
    return this.waiting.length;
  }

  /** A place now: true, and it is held; false when none is free. */
  acquire(): boolean {
    if (this.max === 0 || this.active < this.max) {
      this.active++;
      return true;
    }
    return false;
  }

  /** No place free and no room left in the queue. */
  get full(): boolean {
    return this.waiting.length >= this.queueSize;
  }

  /** A place in the queue: `granted` is called once a place has passed to it (`release`); the function
   * returned gives up the queue place before that, and a place that had passed to it already passes on. */
  wait(granted: () => void): () => void {
    const waiter: Waiter = { granted, since: this.newestFirstMs > 0 ? this.now() : 0 };
    this.waiting.push(waiter);
    return () => {
      const i = this.waiting.indexOf(waiter);
      if (i >= 0) return void this.waiting.splice(i, 1);
      const j = this.handing.indexOf(waiter);
      if (j >= 0) {
        this.handing.splice(j, 1);
        this.release();
      }
    };
  }

  /** The place passes straight to a waiter: the first in line, or, once the first has waited
   * `newestFirstMs`, the last (the queue stands: whoever has waited longest is likeliest to have been given
   * up on by its app, and the newest has the most of its app's patience left). The waiter is told at the
   * end of the event loop's turn, with every other one whose place came free in that turn: answers come in
   * together, and the requests their places let go then go out together — on Bun, whose fetch works on a
   * thread of its own, one wake-up of that thread for all of them rather than one each (inside 100m, with
   * 64 connections and 32 places, about a fifth more small requests a second). */
  release(): void {
    const w = this.waiting;
    if (w.length === 0) {
      this.active--;
      return;
    }
    const next = this.newestFirstMs > 0 && this.now() - w[0].since >= this.newestFirstMs ? w.pop()! : w.shift()!;
    if (this.handing.push(next) === 1) setImmediate(this.hand);
  }

  private readonly hand = () => {
    const handing = this.handing;
    this.handing = [];
    for (const waiter of handing) waiter.granted();
  };
}

// --- Routing and paths -----------------------------------------------------------------------------------

/** The route for a request: the most specific that matches (the list is sorted so), or undefined. A
 * prefix matches at a path-segment boundary: `/inventory` takes `/inventory` and `/inventory/42`, not
 * `/inventory-old`. */
export function matchRoute<R extends Pick<Route, 'host' | 'prefix'>>(
  routes: readonly R[],
  host: string | null,
  path: string,
): R | undefined {
  let name: string | undefined; // the Host without port, worked out only when a route asks for one
  for (const r of routes) {
    if (r.host !== null && r.host !== (name ??= unbracketed(host?.replace(/:\d+$/, '') ?? '').toLowerCase())) continue;
    if (r.prefix === '/' || path === r.prefix || (path.startsWith(r.prefix) && path[r.prefix.length] === '/')) return r;
  }
  return undefined;
}

/** A request path with its dot segments resolved (RFC 3986 §5.2.4), a `.` or `..` spelled with
 * percent-encoded dots (`%2e%2e`) counted as one; every other byte stays as the app sent it. Resolved here,
 * before the path is joined to an upstream's base path, so no target can climb out of that base path (or
 * out of what a route's prefix maps to). null when a dot segment hides behind an encoded slash (`..%2F`),
 * or the path holds a backslash: an upstream that decodes one could still be walked out of its base. */
export function normalizePath(path: string): string | null {
  if (path.includes('\\')) return null;
  if (!path.includes('.') && !/%2e/i.test(path)) return path; // nothing to resolve: the common case
  const dots = (segment: string) => {
    const s = segment.length <= 6 ? segment.replace(/%2e/gi, '.') : '';
    return s === '.' ? 1 : s === '..' ? 2 : 0;
  };
  const segments = path.split('/');
  const out: string[] = [];
  for (let i = 1; i < segments.length; i++) {
    const segment = segments[i];
    const last = i === segments.length - 1;
    const dot = dots(segment);
    if (dot === 0) {
      if (/%2f|%5c/i.test(segment) && segment.split(/%2f|%5c/i).some((part) => dots(part) !== 0)) return null;
      out.push(segment);
      continue;
    }
    if (dot === 2) out.pop(); // never above the root
    if (last) out.push(''); // `/a/b/..` is `/a/`
  }
  return `/${out.join('/')}`;
}

/** A normalized path with the route's prefix taken off: `/inventory/42` under `/inventory` is `/42`. The
 * route matched this same path at a segment boundary, so what is left starts a path of its own. */
export function stripPrefix(path: string, prefix: string): string {
  if (prefix === '/') return path;
  const rest = path.slice(prefix.length);
  return rest.startsWith('/') ? rest : `/${rest}`;
}

/** The upstream URL for a request: the upstream's base path, then the request's (normalized) path and
 * query as they were sent (percent-encoding kept). Never the request's own host: the ambassador is no open
 * proxy. */
export function upstreamUrl(base: URL, pathAndQuery: string): string {
  const basePath = base.pathname.endsWith('/') ? base.pathname.slice(0, -1) : base.pathname;
  return `${base.origin}${basePath}${pathAndQuery}`;
}

/** The characters a request target may hold that WHATWG URL parsing leaves as they are, in path and query
 * alike: such a target is sent as it is; any other is sent as a URL would have it (what fetch sends). */
const PLAIN_TARGET = /^[\w\-.~!$&()*+,;=:@/%?]*$/;

/** The request target an attempt asks the upstream for: the base path, then the request's path and query. */
function upstreamTarget(to: Destination, pathAndQuery: string): string {
  if (PLAIN_TARGET.test(pathAndQuery)) return to.basePath + pathAndQuery;
  const u = new URL(to.baseUrl + pathAndQuery);
  return u.pathname + u.search;
}

/** An address as a URL or a Host header writes it: an IPv6 one in brackets. */
const bracketed = (address: string) => (address.includes(':') ? `[${address}]` : address);
/** A URL's or a Host header's host as a name or an address: an IPv6 one without its brackets. */
const unbracketed = (host: string) => host.replace(/^\[(.*)\]$/, '$1');
/** A URL's port, or its scheme's default. */
const portOf = (url: URL) => Number(url.port || (url.protocol === 'https:' ? 443 : 80));
const isIpLiteral = (hostname: string) => /^\d+\.\d+\.\d+\.\d+$/.test(hostname) || hostname.startsWith('[');

// --- Headers and replies ---------------------------------------------------------------------------------

/** Hop-by-hop headers (RFC 9110 §7.6.1, https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1), plus the
 * obsolete ones Go's ReverseProxy also drops; any header named in `Connection` is hop-by-hop too. */
const HOP_BY_HOP = [
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
];
const HOP_BY_HOP_SET = new Set(HOP_BY_HOP);

export function headerValue(headers: HeaderList, name: string): string | null {
  for (let i = 0; i < headers.length; i++) if (headers[i][0] === name) return headers[i][1];
  return null;
}

/** The headers without hop-by-hop ones and without every header `Connection` names. */
export function stripHopByHop(headers: HeaderList): HeaderList {
  const drop = hopByHop(headers);
  return headers.filter(([name]) => !drop.has(name));
}

/** The names not to pass on: the hop-by-hop ones and every header `Connection` names (every Connection
 * header counts, not only the first). The shared set unless a Connection header names more. */
function hopByHop(headers: HeaderList): ReadonlySet<string> {
  let drop = HOP_BY_HOP_SET;
  for (let i = 0; i < headers.length; i++) {
    if (headers[i][0] !== 'connection') continue;
    for (const named of headers[i][1].split(',')) {
      const token = named.trim().toLowerCase();
      if (drop.has(token)) continue; // keep-alive, close: already dropped
      if (drop === HOP_BY_HOP_SET) drop = new Set(HOP_BY_HOP);
      drop.add(token);
    }
  }
  return drop;
}

/** The request headers the upstream gets. */
export function forwardHeaders(appHeaders: HeaderList, id: string, peer: string | undefined): HeaderList {
  let host: string | null = null;
  let forwardedFor: string | null = null;
  let via: string | null = null;
  let proto = false;
  let forwardedHost = false;
  const out: HeaderList = [];
  const drop = hopByHop(appHeaders);
  for (let i = 0; i < appHeaders.length; i++) {
    const name = appHeaders[i][0], value = appHeaders[i][1];
    if (drop.has(name)) continue;
    switch (name) {
      // The client sets Host from the upstream URL, so the upstream sees its own authority.
      case 'host':
        host = value;
        break;
      // The ambassador has already answered `100 Continue` to the app (Node's fetch refuses to send Expect).
      case 'expect':
        break;
      // Replaced below.
      case 'accept-encoding':
      case 'x-request-id':
        break;
      case 'x-forwarded-for':
        forwardedFor = forwardedFor ? `${forwardedFor}, ${value}` : value;
        break;
      case 'via':
        via = via ? `${via}, ${value}` : value;
        break;
      case 'x-forwarded-proto':
        proto = true;
        out.push([name, value]);
        break;
      case 'x-forwarded-host':
        forwardedHost = true;
        out.push([name, value]);
        break;
      default:
        out.push([name, value]);
    }
  }
  // Ask for the body as it is. Deno's fetch decodes gzip and br for any other value yet keeps the
  // `content-encoding` header, which would hand the app a decoded body labelled as compressed.
  out.push(['accept-encoding', 'identity'], ['x-request-id', id]);
  if (peer) out.push(['x-forwarded-for', forwardedFor ? `${forwardedFor}, ${peer}` : peer]);
  else if (forwardedFor) out.push(['x-forwarded-for', forwardedFor]);
  if (!proto) out.push(['x-forwarded-proto', 'http']);
  if (host && !forwardedHost) out.push(['x-forwarded-host', host]);
  out.push(['via', via ? `${via}, ${VIA}` : VIA]);
  return out;
}

/** The response headers the app gets. */
export function responseHeaders(upstream: HeaderList, id: string): HeaderList {
  let via: string | null = null;
  const out: HeaderList = [];
  const drop = hopByHop(upstream);
  for (let i = 0; i < upstream.length; i++) {
    const name = upstream[i][0], value = upstream[i][1];
    if (drop.has(name)) continue;
    if (name === 'via') via = via ? `${via}, ${value}` : value;
    else if (name !== 'x-request-id') out.push([name, value]);
  }
  out.push(['x-request-id', id], ['via', via ? `${via}, ${VIA}` : VIA]);
  return out;
}

/** What makes a response head one the app must not get, whichever client read it: over Node's 16 KiB (every
 * runtime is held to it, so the app, whose own client likely has the same limit, gets a clean 502 rather
 * than a response it cannot read; Deno's client takes far more), or both framing headers at once (RFC 9112
 * §6.1: how responses are smuggled; Deno's client takes them and passes on a Content-Length its body does
 * not have). A protocol failure, as `classifyFailure` reads the code. */
function responseHeadProblem(headers: HeaderList): Error | undefined {
  let bytes = 0;
  let framing = 0;
  let codings = false;
  for (let i = 0; i < headers.length; i++) {
    const name = headers[i][0], value = headers[i][1];
    bytes += name.length + value.length + 4;
    if (name === 'transfer-encoding') {
      codings ||= (framing & 1) !== 0 || !isChunked(value);
      framing |= 1;
    } else if (name === 'content-length') framing |= 2;
  }
  if (bytes > MAX_RESPONSE_HEAD_BYTES) {
    return Object.assign(new Error(`response headers larger than ${MAX_RESPONSE_HEAD_BYTES} bytes`), {
      code: 'HPE_HEADER_OVERFLOW',
    });
  }
  if (framing === 3) {
    return Object.assign(new Error('the response has both Transfer-Encoding and Content-Length'), {
      code: 'HPE_UNEXPECTED_CONTENT_LENGTH',
    });
  }
  // A coding under the chunked framing (`gzip, chunked`) is taken off with Transfer-Encoding, a hop-by-hop
  // header: the app would get coded bytes it is not told about.
  if (codings) {
    return Object.assign(new Error('the response has a transfer coding other than chunked'), {
      code: 'HPE_INVALID_TRANSFER_ENCODING',
    });
  }
  return undefined;
}

/** Transfer-Encoding that is the chunked framing alone (RFC 9112 §7): the only coding passed through. */
const isChunked = (value: string) => value.trim().toLowerCase() === 'chunked';

/** A 101 to a request that asked for no upgrade (the app's Upgrade is never sent on): a protocol failure. */
const unaskedUpgrade = () =>
  Object.assign(new Error('the upstream switched protocols, though no upgrade was asked for'), {
    code: 'HPE_UNEXPECTED_101',
  });
/** A status line of an HTTP major version other than 1, on an HTTP/1 connection. */
const badVersion = (version: string | undefined) =>
  Object.assign(new Error(`the upstream answered in HTTP/${version}, on an HTTP/1.1 connection`), {
    code: 'HPE_INVALID_VERSION',
  });
/** A final status outside 200–599: no answer the app could be given. */
const badStatus = (status: number) =>
  Object.assign(new Error(`the upstream answered with status ${status}, which is no final HTTP status`), {
    code: 'HPE_INVALID_STATUS',
  });

/** RFC 9112 §4: a reason phrase is tabs, spaces and visible characters. An upstream's that is not (a
 * control character would make Node throw, and a fetch Response refuse it) is not passed on: the app gets
 * its runtime's standard phrase for the status instead. */
const REASON_PHRASE = /^[\t\x20-\x7e]*$/;
function reasonPhrase(text: string): string {
  return REASON_PHRASE.test(text) ? text : '';
}

/** One place maps a failure to what the app receives: 502 when the upstream could not be reached or
 * answered nonsense, 504 when it was too slow, 503 while the ambassador refuses work. Plain text, short,
 * saying what failed and after how many attempts. */
export function failureReply(kind: FailureKind, detail: string, attempts: number, id: string): Reply {
  const tries = attempts === 1 ? '1 attempt' : `${attempts} attempts`;
  return textReply(
    kind === 'timeout' ? 504 : 502,
    `ambassador: upstream ${kind === 'timeout' ? 'timed out' : 'failed'}: ${detail} (${tries})\n`,
    id,
  );
}

const REJECTION_STATUS: Record<Rejection, number> = {
  no_route: 404,
  rate_limit: 429,
  concurrency: 503,
  circuit_open: 503,
  memory: 503,
  draining: 503,
};

/** What the app gets when the ambassador answers for the upstream: 429 over the rate limit, 503 while the
 * upstream is overloaded or its circuit is open, or the ambassador is near its memory limit — each with
 * Retry-After, so a well-behaved client waits. */
export function rejectionReply(reason: Rejection, detail: string, id: string, retryAfterMs?: number): Reply {
  const r = textReply(REJECTION_STATUS[reason], `ambassador: ${detail}\n`, id);
  if (retryAfterMs !== undefined) r.headers.push(['retry-after', String(Math.max(1, Math.ceil(retryAfterMs / 1000)))]);
  return r;
}

/** Every answer the ambassador writes itself: short plain text, whole. Its length is left to the server,
 * which knows it from the body and says the right thing for a HEAD (Deno's says 0, not the text's length). */
function textReply(status: number, text: string, id: string): Reply {
  const headers: HeaderList = [['content-type', 'text/plain; charset=utf-8'], ['x-request-id', id], ['via', VIA]];
  return { status, statusText: '', body: null, whole: new TextEncoder().encode(text), headers };
}

/** A reply that closes the app's connection after it. */
function closing(reply: Reply): Reply {
  reply.headers.push(['connection', 'close']);
  return reply;
}

// =========================================================================================================
// Bodies: a request body is kept for replay only when it is small; a response body is always streamed.
// =========================================================================================================

interface ForwardBody {
  /** what to hand the client for one attempt */
  take(): Uint8Array | ReadableStream<Uint8Array> | null;
  replayable: boolean;
  bytes(): number;
  /** settles once the whole body has gone to the client: timeouts count from then, as Envoy's do, so a
   * large upload is not cut off for taking longer than TRY_TIMEOUT_MS to send; null: it has gone */
  sent: Promise<void> | null;
  /** a streamed body: `stalled` is told once the upstream has taken none of it for the body idle time */
  watch(stalled: (err: Error) => void): void;
  /** gives back the memory a body kept for replay held (see `ReplayMemory`) */
  release(): void;
}

const NO_BODY: ForwardBody = {
  take: () => null,
  replayable: true,
  bytes: () => 0,
  sent: null,
  watch: noop,
  release: noop,
};

/** The bodies kept for replay, in bytes, across every request at once: each at most RETRY_BODY_MAX_BYTES,
 * all of them at most RETRY_BODIES_MAX_BYTES. A body that would go past it is streamed, sent once, as a
 * large one is: a burst of uploads cannot buy the process's memory with replay copies. */
export class ReplayMemory {
  held = 0;
  readonly max: number;
  constructor(max: number) {
    this.max = max;
  }
  take(bytes: number): boolean {
    if (this.held + bytes > this.max) return false;
    this.held += bytes;
    return true;
  }
  give(bytes: number): void {
    this.held -= bytes;
  }
}

/** Reads at most `limit` bytes of a request body. Small bodies are kept whole and can be sent again; a
 * larger one goes on as a stream (what was read, then the rest), sent once (Envoy's silent skip is
 * envoy#29386: here the log says so). A streamed body counts as stalled when the upstream takes none of
 * it for `idleMs` (0: never) — an upstream that accepts a request and never reads it — which is timed
 * only while nothing is asking for the next chunk: a slow app is the request body's own 408. */
async function prepareBody(
  body: ReadableStream<Uint8Array> | null,
  declared: number | undefined,
  limit: number,
  memory: ReplayMemory,
  idleMs: number,
): Promise<ForwardBody> {
  if (body === null) return NO_BODY;
  const reader = body.getReader();
  const streamedBody = (first: Uint8Array[]): ForwardBody => {
    let streamed = 0;
    let markSent!: () => void;
    const sent = new Promise<void>((resolve) => (markSent = resolve));
    let stalled: ((err: Error) => void) | undefined;
    let timer: Timer | undefined;
    const stream = new ReadableStream<Uint8Array>({
      async pull(c) {
        clearTimer(timer);
        const next = first.length > 0 ? { done: false as const, value: first.shift()! } : await reader.read();
        if (next.done) {
          c.close();
          return markSent();
        }
        streamed += next.value.byteLength;
        c.enqueue(next.value);
        if (idleMs > 0 && stalled) {
          const f = stalled;
          timer = setTimer(
            () => f(new TimeoutError(`the upstream took no request body bytes for ${idleMs} ms`)),
            idleMs,
          );
        }
      },
      cancel(reason) {
        clearTimer(timer);
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
    void sent.then(() => clearTimer(timer));
    return {
      take: onlyOnce(stream),
      replayable: false,
      bytes: () => streamed,
      sent,
      watch: (f) => void (stalled = f),
      release: noop,
    };
  };
  if (declared !== undefined && declared > limit) return streamedBody([]);
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
    if (size > limit || !memory.take(value.byteLength)) {
      memory.give(size - value.byteLength);
      return streamedBody(chunks);
    }
  }
  const whole = chunks.length === 1 ? chunks[0] : concat(chunks, size);
  let held = size;
  return {
    take: () => whole,
    replayable: true,
    bytes: () => size,
    sent: null,
    watch: noop,
    release: () => void (memory.give(held), (held = 0)),
  };
}

/** A body at its source as a web stream that pulls one chunk at a time (nothing is read ahead: Node 20's
 * Readable.toWeb would queue up to 16384 chunks), and errors with a 408 after `idleMs` (if > 0) without one.
 * `done`: it ended whole; `gone`: it broke off, which is the app gone. */
function bodyStream(source: BodySource, idleMs: number, done?: () => void, gone?: Cancel): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    async pull(c) {
      let chunk: IteratorResult<Uint8Array> | ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = idleMs <= 0 ? await source.next() : await raceTimer(source.next(), idleMs, () => {
          throw new ClientError(408, `the request body stalled: no bytes for ${idleMs} ms`);
        });
      } catch (err) {
        // A body that breaks off is the app gone (its connection closed or reset mid-body), however its
        // runtime tells it; one that stalled is the app's 408.
        if (!(err instanceof ClientError)) gone?.abort(err);
        source.giveUp(err);
        throw err;
      }
      if (chunk.done) {
        c.close();
        done?.();
      } else c.enqueue(chunk.value);
    },
    cancel: (reason) => source.cancel(reason),
  }, { highWaterMark: 0 });
}

/** A Node stream (a Node upstream's response) as a web stream that reads only as fast as its consumer
 * takes it. Cancelling it destroys the Node stream. */
function streamFromNode(readable: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> {
  const it = readable[Symbol.asyncIterator]();
  return bodyStream(
    { next: () => it.next(), cancel: async (reason) => void (await it.return?.(reason)), giveUp: noop },
    0,
  );
}

/** `value` the first time, null after. */
function onlyOnce<T>(value: T): () => T | null {
  let used = false;
  return () => (used ? null : ((used = true), value));
}

/** `f`, called at most once: how a body ended is told once, whichever way it ends first. */
function callOnce<A extends unknown[]>(f: (...args: A) => void): (...args: A) => void {
  let called = false;
  return (...args) => {
    if (!called) (called = true), f(...args);
  };
}

function concat(chunks: Uint8Array[], size: number): Uint8Array {
  const out = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.byteLength;
  }
  return out;
}

/** Reads a response body chunk by chunk, counting bytes and telling `done` once how it ended; an upstream
 * that sends nothing for `idleMs` (if > 0) is cut off. `next` gives the next chunk, null at the end, or
 * rejects: the upstream failed, or stalled. `cancel`: the app went away.
 *
 * With `scratchBytes`, a body that is a byte stream (Deno's fetch) is read into one buffer of that size, the
 * same for every read, and each chunk `next` gives lives only until the next call: the caller copies it out.
 * Otherwise Deno reads each piece into a fresh 64 KiB buffer, which V8 counts as memory outside its heap
 * until a garbage collection, and under load their sum set off eight full collections a second. */
function bodyReader(body: ReadableStream<Uint8Array>, idleMs: number, done: BodyDone, scratchBytes = 0) {
  const into = scratchBytes > 0 ? byobReader(body) : undefined;
  const plain = into ? undefined : body.getReader();
  const reader = (into ?? plain)!;
  let scratch: Uint8Array<ArrayBuffer> | undefined = into && new Uint8Array(scratchBytes);
  let bytes = 0;
  // One timer for the whole body, not one raced against every read: it looks at the read waiting now, and
  // sets itself again for what is left of that read's `idleMs`. Time no read waits (the app reading slowly)
  // does not count. A stall cancels the reader, which settles the waiting read (as done, by the streams
  // standard), and that read then fails with the stall rather than end the body as if it were whole.
  let timer: Timer | undefined;
  let waitingSince = 0; // 0: no read is waiting
  let stalled: TimeoutError | null = null;
  const end = callOnce((error?: string) => {
    clearTimer(timer);
    done(bytes, error);
  });
  const watch = () => {
    timer = undefined;
    if (waitingSince === 0) return; // the next read sets it again
    const waited = performance.now() - waitingSince;
    if (waited < idleMs) {
      timer = setTimer(watch, idleMs - waited);
      return;
    }
    stalled = new TimeoutError(`no body bytes for ${idleMs} ms`);
    void reader.cancel(stalled).catch(noop);
  };
  return {
    async next(): Promise<Uint8Array | null> {
      try {
        if (idleMs > 0) {
          waitingSince = performance.now();
          timer ??= setTimer(watch, idleMs);
        }
        const read = into ? into.read(scratch!) : plain!.read();
        const chunk: ReadableStreamReadResult<Uint8Array> = await read;
        waitingSince = 0;
        if (stalled) throw stalled;
        // The scratch buffer comes back with the chunk (a read takes it, a new one in its place), for the next.
        if (into && chunk.value) scratch = new Uint8Array(chunk.value.buffer as ArrayBuffer);
        if (chunk.done) return end(), null;
        bytes += chunk.value.byteLength;
        return chunk.value;
      } catch (err) {
        end(`upstream body failed: ${describeFailure(err)}`);
        throw err;
      }
    },
    cancel(reason: unknown): Promise<void> {
      end('client went away during the response body');
      return reader.cancel(reason);
    },
  };
}

/** A reader that reads into the buffer it is given, where the body is a byte stream. */
function byobReader(body: ReadableStream<Uint8Array>): ReadableStreamBYOBReader | undefined {
  try {
    return body.getReader({ mode: 'byob' });
  } catch {
    return undefined; // not a byte stream
  }
}

/** Passes a response body through chunk by chunk, read by `bodyReader`. An upstream error mid-body errors
 * this stream, so the app sees a broken response, never a short one that looks whole. Nothing is read ahead
 * (highWaterMark 0), so server-sent events reach the app as the upstream sends them.
 *
 * `direct` (Bun): one of Bun's "direct" streams, whose chunks go straight to the app's connection instead
 * of through a stream queue (the queue cost Bun half its throughput). Each chunk is flushed as it comes, and
 * the write is awaited, so a slow app slows the reading. Once written, a chunk's memory is given back at once
 * (`release`) rather than at the next garbage collection. `ownBuffers` (a fetch body's, on Deno): each chunk
 * is in a buffer made for it, given back once the server has taken it. */
function trackBody(
  body: ReadableStream<Uint8Array>,
  idleMs: number,
  done: BodyDone,
  direct = false,
  ownBuffers = false,
): ReadableStream<Uint8Array> {
  const { next, cancel } = bodyReader(body, idleMs, done);
  if (direct) {
    type Direct = {
      write(chunk: Uint8Array): number | Promise<number>;
      flush(): number | Promise<number>;
      close(): void;
    };
    return new ReadableStream({
      type: 'direct',
      async pull(c: Direct) {
        try {
          for (let chunk = await next(); chunk !== null; chunk = await next()) {
            await c.write(chunk);
            await c.flush();
            release(chunk);
          }
        } catch {
          throw CUT_OFF;
        }
        c.close();
      },
      cancel,
    } as unknown as UnderlyingDefaultSource<Uint8Array>);
  }
  // The server asks for a chunk only once it has taken the one before (nothing is queued ahead of it): that one
  // is given back then, where each chunk's buffer was made for it. Deno's server holds the memory of a chunk it
  // has taken until it is written (a chunk changed after it was taken goes out changed), so detaching it drops
  // only V8's count of it, whose growth would set off full collections.
  let taken: Uint8Array | undefined;
  return new ReadableStream<Uint8Array>({
    async pull(c) {
      if (taken) release(taken, true), taken = undefined;
      try {
        const chunk = await next();
        if (chunk === null) c.close();
        else c.enqueue(chunk), taken = ownBuffers && chunk.byteOffset === 0 ? chunk : undefined;
      } catch {
        c.error(CUT_OFF);
      }
    },
    cancel,
  }, { highWaterMark: 0 });
}

/** Gives a chunk's memory back now, when the chunk is the whole of its buffer (nothing else can see it), or,
 * with `wholeBuffer`, when the caller knows the buffer was made for this chunk alone (Deno's fetch reads each
 * piece into a fresh 64 KiB buffer, the chunk at its start): detaching the buffer frees it, or leaves it to
 * the server where the server still holds it. Only for a chunk the server has written or taken already. The
 * clients hand each piece of a body to JavaScript in a buffer of its own, which otherwise waits for the next
 * garbage collection. Bun's are up to a few hundred KiB: meanwhile its allocator hands out fresh pages and, in
 * a process throttled to a tenth of a core, gives the freed ones back to the system before it can use them
 * again, so every body costs page faults. Node's and Deno's are 64 KiB, counted by V8 as memory outside its
 * heap, whose growth sets off full collections. Freed now, the next piece reuses the memory. Where `transfer`
 * is missing (Node 20), nothing is done. */
function release(chunk: Uint8Array, wholeBuffer = false): void {
  const buffer = chunk.buffer as ArrayBuffer & { transfer?(length: number): ArrayBuffer };
  if (wholeBuffer || (chunk.byteOffset === 0 && chunk.byteLength === buffer.byteLength)) buffer.transfer?.(0);
}

/** What a response body the server is writing fails with when it must be cut off (its upstream broke or
 * stalled, its app went away): no reason at all. The app sees the body cut off either way, and why is in the
 * request's log line already (`bodyReader` tells `done`). Bun's server prints any other reason to stderr,
 * with the code around it, and Deno's hands it to `onError`: a dump on stderr each time a broken upstream
 * breaks a body. */
const CUT_OFF = null;

/** The longest response body, by its Content-Length, that Deno and Bun read whole before they answer. */
const WHOLE_BODY_MAX = 64 * 1024;

/** A reply as the web Response a server writes: its body passed on by `trackBody` when `done` is given,
 * else as it is (an answer of the ambassador's own). A fetch body that says it is at most `WHOLE_BODY_MAX`
 * bytes long is read whole first (`wholeResponse`); `appGone` tells whether the app has gone meanwhile. */
function webResponse(
  reply: Reply,
  done: BodyDone | undefined,
  idleMs: number,
  direct: boolean,
  appGone: () => boolean = () => false,
): Response | Promise<Response> {
  if (reply.whole) {
    done?.(reply.whole.byteLength);
    return bytesResponse(
      reply.whole,
      { status: reply.status, statusText: reply.statusText, headers: reply.headers },
      direct,
    );
  }
  const body = bodyOf(reply);
  if (done && body === null) done(0);
  if (done && reply.body && declaredLength(reply) <= WHOLE_BODY_MAX) {
    return wholeResponse(reply, reply.body, done, idleMs, direct, appGone);
  }
  return new Response(body && done ? trackBody(body, idleMs, done, direct, !reply.node) : body, {
    status: reply.status,
    statusText: reply.statusText,
    headers: reply.headers,
  });
}

/** A short body read whole, by the same rules as one passed on, and answered as one piece: Bun writes a
 * stream's body chunked, without the Content-Length the upstream gave, and a write a chunk, where a whole
 * body goes out with its head in one write (a sixth of Bun's CPU a request, measured A/B). The reading
 * holds at most `WHOLE_BODY_MAX` bytes, within the bound a stream holds anyway. If the upstream fails or
 * stalls partway, the app gets the head, the bytes that came, and then a broken body, as it would have had
 * them streamed. An app that goes away meanwhile cancels the fetch, and the read that fails of it is told
 * as the app gone. */
async function wholeResponse(
  reply: Reply,
  body: ReadableStream<Uint8Array>,
  done: BodyDone,
  idleMs: number,
  direct: boolean,
  appGone: () => boolean,
): Promise<Response> {
  const init = { status: reply.status, statusText: reply.statusText, headers: reply.headers };
  const length = declaredLength(reply);
  // On Deno the reads go into one scratch buffer a byte longer than the body says (the read that finds the end
  // needs room for one), each chunk copied out as it comes.
  const scratch = direct ? 0 : length + 1;
  const told: BodyDone = (bytes, error) =>
    done(bytes, error !== undefined && appGone() ? 'client went away during the response body' : error);
  const { next } = bodyReader(body, idleMs, told, scratch);
  const chunks: Uint8Array[] = [];
  let size = 0;
  try {
    for (let chunk = await next(); chunk !== null; chunk = await next()) {
      chunks.push(scratch ? chunk.slice() : chunk);
      size += chunk.byteLength;
    }
  } catch (err) {
    // Passed on as a streamed body that breaks, on each server. The break waits a turn of the event loop,
    // so the bytes before it are out (Bun's server holds writes until the turn ends, and drops them if the
    // response fails first).
    let sent = 0;
    const broken = new ReadableStream<Uint8Array>({
      pull: async (c) => {
        if (sent < chunks.length) return c.enqueue(chunks[sent++]);
        await new Promise((r) => setTimeout(r, 0));
        c.error(err);
      },
    }, { highWaterMark: 0 });
    return new Response(trackBody(broken, 0, noop, direct), init);
  }
  return bytesResponse(chunks.length === 1 ? chunks[0] : concat(chunks, size), init, direct);
}

/** The answer for a body had whole, with the upstream's head. Bun's server (`direct`) gives a body of bytes that
 * has no type `Content-Type: application/octet-stream`, which the upstream never said; such a body goes as a
 * stream of one chunk, which it writes as it is, with its length and no type. */
function bytesResponse(
  bytes: Uint8Array,
  init: { status: number; statusText: string; headers: HeaderList },
  direct: boolean,
): Response {
  const body = bytes as Uint8Array<ArrayBuffer>;
  if (!direct || body.byteLength === 0 || headerValue(init.headers, 'content-type') !== null) {
    return new Response(body, init);
  }
  return new Response(new ReadableStream({ start: (c) => (c.enqueue(body), c.close()) }), init);
}

/** Bun's `peek`: a promise's value, read at once when it has settled (`status`); none on Node and Deno. */
const peek = (globalThis as { Bun?: Pick<BunLike, 'peek'> }).Bun?.peek;

/** A reply's body as a web stream, made from the Node stream only where one is needed. */
function bodyOf(reply: Reply): ReadableStream<Uint8Array> | null {
  return reply.node ? streamFromNode(reply.node) : reply.body;
}

/** Lets go of a reply not passed on: its body is read to the end (Node) or cancelled (fetch). */
function discard(reply: Reply): void {
  if (reply.upgraded) reply.upgraded.socket.destroy();
  else if (reply.node) reply.node.resume();
  else reply.body?.cancel().catch(noop);
}

/** Lets go of a reply that broke the protocol: its connection is closed, never read on or pooled. */
function drop(reply: Reply): void {
  if (reply.upgraded) reply.upgraded.socket.destroy();
  else if (reply.node) reply.node.destroy();
  else reply.body?.cancel().catch(noop);
}

// =========================================================================================================
// WebSockets: a handshake the upstream accepts (its 101) becomes a tunnel between the app and that
// upstream, held like a request until it closes. Only `Upgrade: websocket` (RFC 6455); any other upgrade,
// h2c above all, is forwarded as a plain request without it, never tunnelled.
// =========================================================================================================

/** The largest message passed on where the ambassador reads messages (Deno, Bun): Bun's own default. */
const WS_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;
/** What may wait unsent towards one end before reading from the other stops (Deno, Bun). */
const WS_BUFFER_BYTES = 1024 * 1024;
/** How long an end is given to close after its close frame, before its connection is cut. */
const WS_CLOSE_WAIT_MS = 1000;
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const OP_TEXT = 1;
const OP_BINARY = 2;
const OP_CLOSE = 8;
const OP_PING = 9;
const OP_PONG = 10;

/** The upstream's end of a tunnel: the connection its 101 came on (node:http's, on every runtime), and the
 * bytes that came after the 101's head. */
export interface UpstreamTunnel {
  socket: TunnelSocket;
  head: Uint8Array;
}

/** The parts of a Node socket a tunnel uses. */
export interface TunnelSocket {
  write(chunk: Uint8Array | string): boolean;
  end(): void;
  destroy(): void;
  pause(): void;
  resume(): void;
  on(event: 'data', f: (chunk: Uint8Array) => void): void;
  on(event: 'drain' | 'end' | 'close', f: () => void): void;
  on(event: 'error', f: (err: Error) => void): void;
}

/** Who ended a tunnel: an end closing, the idle cut, the drain, or a broken connection or frame. */
export type TunnelEnd = 'app' | 'upstream' | 'idle' | 'drain' | 'error';

/** The app's end where its server speaks WebSocket itself (Deno, Bun): whole messages. */
export interface MessageSocket {
  send(data: string | Uint8Array): void;
  close(code: number, reason: string): void;
  /** bytes given to `send` and not yet written */
  buffered(): number;
}

/** What the app's server tells a message tunnel (Deno, Bun). */
export interface MessageRelay {
  message(data: string | Uint8Array): void;
  closed(code: number, reason: string): void;
}

/** Whether a request asks for a WebSocket (RFC 6455 §4.1): a GET whose Upgrade names websocket and whose
 * Connection names upgrade. */
export function isWebSocketUpgrade(method: string, headers: HeaderList): boolean {
  if (method !== 'GET') return false;
  let upgrade = false;
  let connection = false;
  for (const [name, value] of headers) {
    if (name === 'upgrade') upgrade ||= hasToken(value, 'websocket');
    else if (name === 'connection') connection ||= hasToken(value, 'upgrade');
  }
  return upgrade && connection;
}

function hasToken(value: string, token: string): boolean {
  return value.split(',').some((t) => t.trim().toLowerCase() === token);
}

/** What the upstream's 101 must carry for the app's key (RFC 6455 §4.2.2). */
export async function acceptFor(key: string): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-1', new TextEncoder().encode(key + WS_GUID)));
  return btoa(String.fromCharCode(...digest));
}

/** Why an upstream's 101 cannot become the app's tunnel, if it cannot. */
export async function upgradeProblem(appHeaders: HeaderList, reply: HeaderList): Promise<string | undefined> {
  if (!isWebSocketUpgrade('GET', [...reply, ['connection', 'upgrade']])) {
    return 'the upstream switched to a protocol other than websocket';
  }
  const key = headerValue(appHeaders, 'sec-websocket-key') ?? '';
  if (headerValue(reply, 'sec-websocket-accept') !== await acceptFor(key)) {
    return "the upstream's Sec-WebSocket-Accept does not match the app's key";
  }
  return undefined;
}

/** One open tunnel: the bytes each way (as the upstream took and sent them), the idle cut, the drain's going
 * away, and the one report of how it ended. The app's end is its connection (`bytes`, Node: frames pass
 * untouched, extensions included) or a WebSocket its server runs (`messages`, Deno and Bun). */
export class Tunnel {
  /** bytes the upstream took, and sent */
  up = 0;
  down = 0;
  /** closes both ends with 1001 Going Away (`by`: the drain, or the idle cut) */
  goAway: (by: TunnelEnd) => void = noop;
  private readonly upstream: UpstreamTunnel;
  private readonly idleMs: number;
  private readonly done: (by: TunnelEnd, error?: string) => void;
  private idle: ReturnType<typeof setTimeout> | undefined;
  private by: TunnelEnd | undefined;
  private error: string | undefined;
  private ended = false;

  constructor(upstream: UpstreamTunnel, idleMs: number, done: (by: TunnelEnd, error?: string) => void) {
    this.upstream = upstream;
    this.idleMs = idleMs;
    this.done = done;
  }

  /** Node: the app's connection and what it sent after its handshake; bytes pass as they come. */
  bytes(app: TunnelSocket, appHead: Uint8Array): void {
    const upstream = this.upstream.socket;
    // Each way, where its frames begin and end: the drain's close frame goes in between two frames.
    const closing = (who: TunnelEnd) => () => void (this.by ??= who);
    const down = {
      from: upstream,
      into: app,
      masked: false,
      frames: new FrameBoundaries(closing('upstream')),
      stopped: false,
    };
    const up = { from: app, into: upstream, masked: true, frames: new FrameBoundaries(closing('app')), stopped: false };
    let going = false;
    const stop = (way: typeof up) => {
      way.stopped = true;
      way.into.write(encodeFrame(OP_CLOSE, closePayload(1001, 'going away'), way.masked));
      if (up.stopped && down.stopped) app.end(), upstream.end();
    };
    const pass = (way: typeof up, count: (n: number) => void) => (chunk: Uint8Array) => {
      if (way.stopped) return;
      const part = going ? chunk.subarray(0, way.frames.advance(chunk, true)) : chunk;
      if (!going) way.frames.advance(chunk, false);
      count(part.byteLength);
      this.touch();
      if (part.byteLength > 0 && !way.into.write(part)) way.from.pause();
      if (going && way.frames.atBoundary) stop(way);
    };
    upstream.on('drain', () => app.resume());
    app.on('drain', () => upstream.resume());
    upstream.on('data', pass(down, (n) => (this.down += n)));
    app.on('data', pass(up, (n) => (this.up += n)));
    let open = 2;
    const closed = () => --open === 0 && this.finish();
    this.ends(app, upstream, 'app', closed);
    this.ends(upstream, app, 'upstream', closed);
    this.goAway = (by) => {
      if (going) return;
      going = true;
      this.by ??= by;
      for (const way of [up, down]) if (way.frames.atBoundary) stop(way);
      this.cutLater(app, upstream);
    };
    this.startIdle();
    if (this.upstream.head.byteLength > 0) pass(down, (n) => (this.down += n))(this.upstream.head);
    if (appHead.byteLength > 0) pass(up, (n) => (this.up += n))(appHead);
    upstream.resume();
    app.resume();
  }

  /** Deno, Bun: the app's WebSocket, once open. Messages are read whole from the upstream's frames and written
   * as frames of the app's messages; pings are answered here. */
  messages(app: MessageSocket): MessageRelay {
    const upstream = this.upstream.socket;
    let appClosed = false;
    let closeSent = false;
    const closeApp = (code: number, reason: string) => {
      if (appClosed) return;
      appClosed = true;
      app.close(code, reason);
    };
    const closeUpstream = (code: number | null, reason = '') => {
      if (closeSent) return;
      closeSent = true;
      const frame = encodeFrame(OP_CLOSE, code === null ? new Uint8Array(0) : closePayload(code, reason), true);
      this.up += frame.byteLength;
      upstream.write(frame);
      upstream.end();
      this.cutLater(upstream);
    };
    const text = new TextDecoder('utf-8', { fatal: true });
    const reader = new FrameReader(WS_MAX_MESSAGE_BYTES, {
      message: (isText, data) => {
        let value: string | Uint8Array = data;
        if (isText) {
          try {
            value = text.decode(data);
          } catch {
            return reader.fail(1007, 'a text message that is not UTF-8');
          }
        }
        app.send(value);
        if (app.buffered() > WS_BUFFER_BYTES) this.waitForSent(app, upstream);
      },
      ping: (payload) => void upstream.write(encodeFrame(OP_PONG, payload, true)),
      close: (code, reason) => {
        this.by ??= 'upstream';
        closeApp(code === null || !sendableCode(code) ? 1000 : code, reason);
        closeUpstream(code, reason);
      },
      fail: (code, why) => {
        this.by ??= 'error';
        this.error ??= `the upstream broke the WebSocket protocol: ${why}`;
        closeApp(code, why);
        closeUpstream(code, why);
      },
    });
    upstream.on('data', (chunk) => {
      this.down += chunk.byteLength;
      this.touch();
      reader.push(chunk);
    });
    upstream.on('error', (err) => (this.error ??= describeFailure(err)));
    upstream.on('close', () => {
      this.by ??= 'upstream';
      closeApp(1011, 'the upstream closed its connection');
      this.finish();
    });
    let queued = 0;
    upstream.on('drain', () => (queued = 0));
    this.goAway = (by) => {
      this.by ??= by;
      closeApp(1001, 'going away');
      closeUpstream(1001, 'going away');
    };
    this.startIdle();
    if (this.upstream.head.byteLength > 0) {
      this.down += this.upstream.head.byteLength;
      reader.push(this.upstream.head);
    }
    upstream.resume();
    return {
      message: (data) => {
        if (closeSent) return;
        this.touch();
        const isText = typeof data === 'string';
        const frame = encodeFrame(isText ? OP_TEXT : OP_BINARY, isText ? new TextEncoder().encode(data) : data, true);
        this.up += frame.byteLength;
        // The app's server cannot be told to stop reading: an upstream that takes nothing ends the tunnel.
        if (!upstream.write(frame) && (queued += frame.byteLength) > WS_MAX_MESSAGE_BYTES) {
          this.by ??= 'error';
          this.error ??= 'the upstream took none of the messages sent to it';
          closeApp(1013, 'the upstream is not reading');
          upstream.destroy();
        }
      },
      closed: (code, reason) => {
        appClosed = true;
        this.by ??= 'app';
        closeUpstream(sendableCode(code) ? code : null, reason);
      },
    };
  }

  private touch(): void {
    this.idle?.refresh();
  }

  private startIdle(): void {
    if (this.idleMs > 0) this.idle = setTimeout(() => this.goAway('idle'), this.idleMs);
  }

  /** `socket`'s end: the first end to close closes the other; `closed` is told when it has. */
  private ends(socket: TunnelSocket, other: TunnelSocket, who: TunnelEnd, closed: () => void): void {
    socket.on('error', (err) => (this.error ??= `${who}: ${describeFailure(err)}`));
    socket.on('end', () => {
      this.by ??= who;
      other.end();
    });
    socket.on('close', () => {
      this.by ??= who;
      other.end();
      this.cutLater(other);
      closed();
    });
  }

  /** Connections still open WS_CLOSE_WAIT_MS after their end was asked for are cut. */
  private cutLater(...sockets: TunnelSocket[]): void {
    setTimeout(() => sockets.forEach((s) => s.destroy()), WS_CLOSE_WAIT_MS);
  }

  /** Holds reading from the upstream until the app's WebSocket has written what it was given. */
  private waitForSent(app: MessageSocket, upstream: TunnelSocket): void {
    upstream.pause();
    const check = setInterval(() => {
      if (app.buffered() > WS_BUFFER_BYTES / 4 && !this.ended) return;
      clearInterval(check);
      upstream.resume();
    }, 20);
  }

  private finish(): void {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.idle);
    this.done(this.by ?? 'error', this.error);
  }
}

/** Codes an endpoint may put in a close frame (RFC 6455 §7.4): 1005, 1006 and 1015 only ever describe one. */
function sendableCode(code: number): boolean {
  return (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) ||
    (code >= 3000 && code <= 4999);
}

function closePayload(code: number, reason: string): Uint8Array {
  const text = new TextEncoder().encode(reason).subarray(0, 123);
  const out = new Uint8Array(2 + text.byteLength);
  out[0] = code >> 8;
  out[1] = code & 255;
  out.set(text, 2);
  return out;
}

/** One frame, FIN set (RFC 6455 §5.2); a client's (to the upstream) masked. */
export function encodeFrame(opcode: number, payload: Uint8Array, masked: boolean): Uint8Array {
  const n = payload.byteLength;
  const extra = n < 126 ? 0 : n < 65536 ? 2 : 8;
  const head = 2 + extra + (masked ? 4 : 0);
  const out = new Uint8Array(head + n);
  out[0] = 0x80 | opcode;
  out[1] = (masked ? 0x80 : 0) | (n < 126 ? n : n < 65536 ? 126 : 127);
  if (extra === 2) (out[2] = n >> 8), (out[3] = n & 255);
  else if (extra === 8) new DataView(out.buffer).setBigUint64(2, BigInt(n));
  if (!masked) {
    out.set(payload, head);
    return out;
  }
  const key = crypto.getRandomValues(new Uint8Array(4));
  out.set(key, head - 4);
  for (let i = 0; i < n; i++) out[head + i] = payload[i] ^ key[i & 3];
  return out;
}

/** A frame head's length once its first two bytes are in (null before). */
function frameHeadLength(head: readonly number[]): number | null {
  if (head.length < 2) return null;
  const len = head[1] & 0x7f;
  return 2 + (len === 126 ? 2 : len === 127 ? 8 : 0) + (head[1] & 0x80 ? 4 : 0);
}

function framePayloadLength(head: readonly number[]): number {
  const len = head[1] & 0x7f;
  if (len < 126) return len;
  if (len === 126) return (head[2] << 8) | head[3];
  let n = 0;
  for (let i = 2; i < 10; i++) n = n * 256 + head[i];
  return n;
}

/** Where a stream of frames stands: inside a frame, or between two. Only heads are read: their lengths,
 * and whether a close frame passed (`onClose`: the end it came from is the one closing the tunnel). */
export class FrameBoundaries {
  private head: number[] = [];
  private left = 0;
  private readonly onClose: () => void;

  constructor(onClose: () => void = noop) {
    this.onClose = onClose;
  }

  get atBoundary(): boolean {
    return this.left === 0 && this.head.length === 0;
  }

  /** Reads `chunk` on (with `stop`, only up to the first point between two frames): the bytes read. */
  advance(chunk: Uint8Array, stop: boolean): number {
    let at = 0;
    while (at < chunk.byteLength) {
      if (stop && this.atBoundary) return at;
      if (this.left > 0) {
        const n = Math.min(this.left, chunk.byteLength - at);
        this.left -= n;
        at += n;
        continue;
      }
      this.head.push(chunk[at++]);
      const length = frameHeadLength(this.head);
      if (length !== null && this.head.length === length) {
        if ((this.head[0] & 0x0f) === OP_CLOSE) this.onClose();
        this.left = framePayloadLength(this.head);
        this.head = [];
      }
    }
    return at;
  }
}

/** Reads a server's frames (unmasked) into whole messages, control frames apart; a broken frame or a
 * message past `maxBytes` fails it with the close code to send. */
export class FrameReader {
  private head: number[] = [];
  private left = 0;
  private frame: { fin: boolean; opcode: number; parts: Uint8Array[]; size: number } | null = null;
  private message: { text: boolean; parts: Uint8Array[]; size: number } | null = null;
  private failed = false;
  private readonly maxBytes: number;
  private readonly on: {
    message(text: boolean, data: Uint8Array): void;
    ping(payload: Uint8Array): void;
    close(code: number | null, reason: string): void;
    fail(code: number, why: string): void;
  };

  constructor(maxBytes: number, on: FrameReader['on']) {
    this.maxBytes = maxBytes;
    this.on = on;
  }

  fail(code: number, why: string): void {
    if (this.failed) return;
    this.failed = true;
    this.on.fail(code, why);
  }

  push(chunk: Uint8Array): void {
    let at = 0;
    while (!this.failed && (at < chunk.byteLength || (this.frame !== null && this.left === 0))) {
      if (this.frame === null) {
        this.head.push(chunk[at++]);
        const length = frameHeadLength(this.head);
        if (length === null || this.head.length < length) continue;
        this.begin(this.head);
        this.head = [];
        continue;
      }
      if (this.left > 0) {
        const n = Math.min(this.left, chunk.byteLength - at);
        this.frame.parts.push(chunk.subarray(at, at + n));
        this.frame.size += n;
        this.left -= n;
        at += n;
        if (this.left > 0) continue;
      }
      const frame = this.frame;
      this.frame = null;
      this.complete(frame);
    }
  }

  private begin(head: number[]): void {
    const fin = (head[0] & 0x80) !== 0;
    const opcode = head[0] & 0x0f;
    const length = framePayloadLength(head);
    if (head[0] & 0x70) return this.fail(1002, 'reserved bits set, and no extension was agreed');
    if (head[1] & 0x80) return this.fail(1002, 'a masked frame from the server');
    if (opcode >= 8) {
      if (opcode > OP_PONG) return this.fail(1002, `unknown opcode ${opcode}`);
      if (!fin || length > 125) return this.fail(1002, 'a control frame fragmented or longer than 125 bytes');
    } else if (opcode > OP_BINARY) return this.fail(1002, `unknown opcode ${opcode}`);
    else if ((opcode === 0) !== (this.message !== null)) return this.fail(1002, 'a message fragment out of order');
    else if ((this.message?.size ?? 0) + length > this.maxBytes) {
      return this.fail(1009, `a message larger than ${this.maxBytes} bytes`);
    }
    this.frame = { fin, opcode, parts: [], size: 0 };
    this.left = length;
  }

  private complete(frame: { fin: boolean; opcode: number; parts: Uint8Array[]; size: number }): void {
    const payload = frame.parts.length === 1 ? frame.parts[0] : concat(frame.parts, frame.size);
    if (frame.opcode === OP_PING) return this.on.ping(payload);
    if (frame.opcode === OP_PONG) return;
    if (frame.opcode === OP_CLOSE) {
      const code = payload.byteLength >= 2 ? (payload[0] << 8) | payload[1] : null;
      let reason = '';
      try {
        reason = new TextDecoder('utf-8', { fatal: true }).decode(payload.subarray(2));
      } catch {
        return this.fail(1007, 'a close reason that is not UTF-8');
      }
      return this.on.close(code, reason);
    }
    const message = this.message ?? { text: frame.opcode === OP_TEXT, parts: [], size: 0 };
    message.parts.push(payload);
    message.size += payload.byteLength;
    this.message = frame.fin ? null : message;
    if (frame.fin) {
      this.on.message(
        message.text,
        message.parts.length === 1 ? message.parts[0] : concat(message.parts, message.size),
      );
    }
  }
}

// =========================================================================================================
// Endpoints and TLS files: the addresses behind each upstream URL, found again every DNS_REFRESH_MS, and
// the certificates, read again when their files change. The only I/O outside the handler; both are done
// when a request needs them, so an idle ambassador does nothing and needs no timers.
// =========================================================================================================

/** Addresses for a host name, and how long they may be kept where the runtime tells (the records' TTL). */
export type Resolve = (hostname: string) => Promise<{ addresses: string[]; ttlMs?: number }>;

export interface Endpoint extends Balanced {
  /** `10.0.0.7:9000`, or the URL's own host:port when the runtime resolves it: the metric and log label */
  readonly key: string;
  /** the upstream URL it serves: its host is what the upstream sees in Host and what TLS verifies */
  readonly base: URL;
  /** connect to this address rather than resolve `base.hostname`; null: the runtime resolves the name */
  readonly address: string | null;
  readonly breaker: Breaker;
  /** where its attempts go, worked out once */
  readonly destination: Destination;
  requests: number;
}

/** Where an endpoint's attempts go, worked out when the endpoint is made rather than per attempt. */
export interface Destination {
  /** the upstream URL's origin and base path (no trailing slash): the request's path and query follow */
  readonly baseUrl: string;
  readonly basePath: string;
  readonly https: boolean;
  /** the URL's host and port, as Host carries them: what the upstream sees and what TLS verifies */
  readonly authority: string;
  /** the URL's host name, without brackets */
  readonly hostname: string;
  /** the name TLS sends (SNI) and verifies, unless the route names another: none for an address */
  readonly serverName: string | undefined;
  readonly port: number;
  /** connect here rather than resolve `hostname`; null: the runtime resolves the name */
  readonly address: string | null;
}

function destinationOf(base: URL, address: string | null): Destination {
  const baseUrl = upstreamUrl(base, '');
  return {
    baseUrl,
    basePath: baseUrl.slice(base.origin.length),
    https: base.protocol === 'https:',
    authority: base.host,
    hostname: unbracketed(base.hostname),
    serverName: isIpLiteral(base.hostname) ? undefined : base.hostname,
    port: portOf(base),
    address,
  };
}

/** The longest a request waits for a lookup (the first, or one after a quiet spell) before going on with
 * what is known (at first, the name itself). */
const FIRST_RESOLVE_WAIT_MS = 2000;
/** A DNS TTL shorter than this is not followed (a TTL of 0 would mean a lookup per request). */
const MIN_REFRESH_MS = 1000;
/** How often the TLS files are looked at while requests flow. */
const TLS_CHECK_MS = 1000;

class EndpointPool {
  endpoints: Endpoint[];
  /** whether any of the route's names is looked up here at all (worked out once) */
  private readonly discovering: boolean;
  private resolvedOnce = false;
  private nextRefreshAt = 0;
  private refreshing: Promise<void> | undefined;

  private readonly route: Route;
  private readonly clock: Clock;
  private readonly resolve: Resolve | undefined;
  /** whether an https:// upstream may be reached by address (the client can still verify its name) */
  private readonly tlsByAddress: boolean;
  private readonly changed: (e: { added: string[]; removed: string[]; endpoints: string[]; error?: string }) => void;

  constructor(
    route: Route,
    clock: Clock,
    resolve: Resolve | undefined,
    tlsByAddress: boolean,
    changed: (e: { added: string[]; removed: string[]; endpoints: string[]; error?: string }) => void,
  ) {
    this.route = route;
    this.clock = clock;
    this.resolve = resolve;
    this.tlsByAddress = tlsByAddress;
    this.changed = changed;
    this.endpoints = route.upstreams.map((u) => this.endpoint(u, null));
    this.discovering = route.upstreams.some((u) => this.discovers(u));
  }

  private discovers(u: URL): boolean {
    return this.resolve !== undefined && this.route.dnsRefreshMs > 0 && !isIpLiteral(u.hostname) &&
      (u.protocol === 'http:' || this.tlsByAddress);
  }

  private endpoint(base: URL, address: string | null): Endpoint {
    const destination = destinationOf(base, address);
    const key = address === null ? base.host : `${bracketed(address)}:${destination.port}`;
    const r = this.route;
    const breaker = new Breaker({
      failures: r.breakerFailures,
      openMs: r.breakerOpenMs,
      openMaxMs: r.breakerOpenMaxMs,
      probes: r.breakerProbes,
    });
    return {
      key,
      base,
      address,
      breaker,
      destination,
      inFlight: 0,
      ewmaMs: 0,
      lastSampleAt: this.clock.now(),
      requests: 0,
    };
  }

  /** The endpoints now. Starts a refresh when one is due. Waits for it only before the first answer, or
   * after a quiet spell long enough that what is known may be long gone (pods replaced while no request
   * came); under steady traffic requests never wait on DNS. */
  current(): Endpoint[] | Promise<Endpoint[]> {
    if (!this.discovering) return this.endpoints;
    const now = this.clock.now();
    const stale = now - this.nextRefreshAt > this.route.dnsRefreshMs;
    if (now >= this.nextRefreshAt && !this.refreshing) {
      this.refreshing = this.refresh().finally(() => (this.refreshing = undefined));
    }
    if ((!this.resolvedOnce || stale) && this.refreshing) return this.refreshed(this.refreshing);
    return this.endpoints;
  }

  private async refreshed(refreshing: Promise<void>): Promise<Endpoint[]> {
    await raceTimer(refreshing, FIRST_RESOLVE_WAIT_MS, noop);
    return this.endpoints;
  }

  private async refresh(): Promise<void> {
    const next: Endpoint[] = [];
    const errors: string[] = [];
    let ttlMs = Infinity;
    for (const base of this.route.upstreams) {
      const known = this.endpoints.filter((e) => e.base === base);
      if (!this.discovers(base)) {
        next.push(...known);
        continue;
      }
      try {
        const found = await this.resolve!(base.hostname);
        if (found.addresses.length === 0) throw new Error('no addresses');
        ttlMs = Math.min(ttlMs, found.ttlMs ?? Infinity);
        for (const address of new Set(found.addresses)) {
          const fresh = this.endpoint(base, address);
          // An endpoint that stays keeps its state: its breaker, its load, its latency.
          next.push(known.find((e) => e.key === fresh.key) ?? fresh);
        }
      } catch (err) {
        // A failed lookup keeps what was known: a DNS hiccup must not empty the pool (nor fill it with a
        // name nobody can resolve).
        errors.push(`${base.hostname}: ${describeFailure(err)}`);
        next.push(...known);
      }
    }
    // The name itself stands in until the first answer: it was never an endpoint of its own to remove.
    const before = new Set(
      this.endpoints.filter((e) => this.resolvedOnce || !this.discovers(e.base)).map((e) => e.key),
    );
    const after = new Set(next.map((e) => e.key));
    const added = [...after].filter((k) => !before.has(k));
    const removed = [...before].filter((k) => !after.has(k));
    this.endpoints = next;
    this.resolvedOnce = true;
    this.nextRefreshAt = this.clock.now() + Math.max(MIN_REFRESH_MS, Math.min(this.route.dnsRefreshMs, ttlMs));
    if (added.length || removed.length || errors.length) {
      this.changed({ added, removed, endpoints: [...after], ...(errors.length ? { error: errors.join('; ') } : {}) });
    }
  }
}

/** The TLS material a connection is made with. A new object whenever a file changed: clients are kept per
 * object, so new connections use the new certificate while open ones finish with the old. */
export interface TlsMaterial {
  readonly ca?: string;
  readonly cert?: string;
  readonly key?: string;
  readonly serverName: string | null;
  readonly minVersion: 'TLSv1.2' | 'TLSv1.3';
}

/** Tries TLS material on the runtime's own TLS stack, throwing what it finds wrong (a key that is not the
 * certificate's, a CA file that does not parse): `nodeCheckTls`, `denoCheckTls`. */
export type CheckTls = (material: TlsMaterial) => void;

/** Reads a route's TLS files into material, and has the runtime check it. */
export function readTls(files: TlsFiles, readFile: ReadFile, check?: CheckTls): TlsMaterial {
  const { caFile, certFile, keyFile, serverName, minVersion } = files;
  const material: TlsMaterial = {
    ...(caFile ? { ca: readFile(caFile) } : {}),
    ...(certFile && keyFile ? { cert: readFile(certFile), key: readFile(keyFile) } : {}),
    serverName,
    minVersion,
  };
  if ([material.ca, material.cert, material.key].some((t) => t !== undefined && !t.includes('-----BEGIN '))) {
    throw new Error('a file holds no PEM block');
  }
  check?.(material);
  return material;
}

class TlsSource {
  material: TlsMaterial;
  private checkAt: number;
  private lastError: string | undefined;

  private readonly files: TlsFiles;
  private readonly readFile: ReadFile;
  private readonly clock: Clock;
  private readonly check?: CheckTls;

  constructor(files: TlsFiles, readFile: ReadFile, clock: Clock, check?: CheckTls) {
    this.files = files;
    this.readFile = readFile;
    this.clock = clock;
    this.check = check;
    this.material = readTls(files, readFile, check);
    this.checkAt = clock.now() + TLS_CHECK_MS;
  }

  /** The material, read again at most every TLS_CHECK_MS. A file caught half-written, or a certificate
   * renewed before its key, keeps the old material until a look finds the set whole again. */
  current(reloaded: (error?: string) => void): TlsMaterial {
    const now = this.clock.now();
    if (now < this.checkAt) return this.material;
    this.checkAt = now + TLS_CHECK_MS;
    try {
      const fresh = readTls(this.files, this.readFile);
      const old = this.material;
      if (fresh.ca !== old.ca || fresh.cert !== old.cert || fresh.key !== old.key) {
        this.check?.(fresh); // only when something changed: the check builds a TLS context
        this.material = fresh;
        reloaded();
      }
      this.lastError = undefined;
    } catch (err) {
      const error = describeFailure(err);
      if (error !== this.lastError) reloaded(error); // once per new problem, not once a second
      this.lastError = error;
    }
    return this.material;
  }
}

// =========================================================================================================
// Logs: one line per event, JSON or text, to stdout.
// =========================================================================================================

const LEVELS: Record<LineLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, notice: 100 };
const BARE = /^[A-Za-z0-9_.:/@+-]+$/;

export function createLogger(
  format: LogFormat,
  minLevel: LogLevel,
  write: (line: string, urgent: boolean) => void = (line) => console.log(line),
): Logger {
  const min = LEVELS[minLevel];
  // The time as ISO text, made once a millisecond rather than once a line.
  let ms = 0;
  let time = '';
  return (level, msg, fields = {}) => {
    if (LEVELS[level] < min) return;
    const now = Date.now();
    if (now !== ms) (ms = now), (time = new Date(now).toISOString());
    if (format === 'json') {
      // `{"time":…,"level":…,"msg":…, …fields}` as JSON.stringify would write it, without a merged copy.
      const rest = JSON.stringify(fields);
      write(
        `{"time":"${time}","level":"${level}","msg":${JSON.stringify(msg)}${rest === '{}' ? '}' : `,${rest.slice(1)}`}`,
        LEVELS[level] >= LEVELS.warn,
      );
    } else {
      // A value is written bare only when it cannot be mistaken for more fields; else it is quoted.
      const rest = Object.entries(fields).map(([k, v]) =>
        `${k}=${typeof v === 'string' && BARE.test(v) ? v : JSON.stringify(v)}`
      );
      write(
        `${time} ${level.toUpperCase().padEnd(6)} ${msg}${rest.length ? ' ' + rest.join(' ') : ''}`,
        LEVELS[level] >= LEVELS.warn,
      );
    }
  };
}

/** The most log text waiting for stdout, written or not yet, in characters (bytes, for the ASCII of the lines
 * it writes; a path is logged as it came, percent-encoded): past it, a line is dropped and counted. */
const LOG_BACKLOG_BYTES = 1024 * 1024;

/** How long the exit waits for a log write still out where the runtime's exit would drop it (Deno): the lines
 * that tell why the process ends (a drain cut short, a second signal) must not be the ones lost. */
const EXIT_LOG_WAIT_MS = 500;

/** Log lines written together, in order. A routine line (info, debug: the access line of a request that went
 * well) waits for the end of the turn of the event loop (`setImmediate`), so a busy proxy writes the access
 * lines of every request finished in a turn at once, not one write a request. An urgent one (warn and
 * above: a failed attempt, a rejection) goes out once the run of code that wrote it is over (a microtask),
 * with whatever waits before it: the lines that tell of a failure are out before its answer has gone far.
 *
 * One write is out at a time: `writeOut` (the runtime's write to stdout, `Runtime.writeOut`) calls back once
 * the system has taken its text, and the lines that came meanwhile go in the next. Whatever reads stdout (the
 * container runtime, a pipe) may fall behind or stop: the text waiting is held to LOG_BACKLOG_BYTES, and a
 * line past it is dropped, counted in `dropped` (`ambassador_log_lines_dropped_total`) and told of by
 * `onDropped` once stdout takes lines again — never held without bound, which would grow the process to its
 * memory limit, nor waited for, which would stop the proxy. Lines a write failed to deliver (stdout closed by
 * its reader) count as dropped too. `flush`, which main awaits before every exit, writes what is waiting at
 * once, whatever is out; where the runtime's exit would drop a write still out (`writeOutAtExit`: Deno, whose
 * exit can end the process before an asynchronous write to a pipe is done), it first waits for that write, up
 * to EXIT_LOG_WAIT_MS, starting no other, then writes the rest through `writeOutAtExit`, which blocks. */
export function batchedLines(
  writeOut: (text: string, written: (failed?: boolean) => void) => void,
  onDropped: (lines: number) => void = noop,
  writeOutAtExit?: (text: string) => void,
): { write(line: string, urgent?: boolean): void; flush(): Promise<void>; readonly dropped: number } {
  let pending: string[] = [];
  let waiting = 0; // text pending or out
  let out = 0; // text of the writes out now (0: none)
  let soon = false; // a flush at the end of this run of code is on its way
  let dropped = 0;
  let untold = 0; // dropped since the last time it was told
  let exiting: (() => void) | undefined; // the exit waits for the write out: called once none is
  const send = (force: boolean) => {
    soon = false;
    if (out === 0 && exiting) return exiting();
    if (pending.length === 0 || (out > 0 && !force)) return;
    const text = pending.length === 1 ? pending[0] : pending.join('\n');
    const lines = pending.length;
    pending = [];
    const bytes = text.length + 1;
    out += bytes;
    writeOut(text, (failed) => {
      if (failed) dropped += lines; // stdout is gone (its reader closed it): nowhere to tell of them but the metric
      out -= bytes;
      waiting -= bytes;
      if (untold > 0 && waiting + 256 <= LOG_BACKLOG_BYTES) { // room for the line that tells of them
        const n = untold;
        untold = 0;
        onDropped(n);
      }
      if (out === 0) send(false);
    });
  };
  const later: (f: () => void) => unknown = typeof setImmediate === 'function' ? setImmediate : (f) => setTimeout(f, 0);
  const flushSoon = () => send(false);
  return {
    write(line, urgent = false) {
      if (waiting + line.length + 1 > LOG_BACKLOG_BYTES) return void (dropped++, untold++);
      waiting += line.length + 1;
      const first = pending.push(line) === 1;
      if (urgent && !soon) (soon = true), queueMicrotask(flushSoon);
      else if (first) later(flushSoon);
    },
    flush: async () => {
      if (!writeOutAtExit) return send(true);
      if (out > 0) {
        await new Promise<void>((resolve) => {
          exiting = resolve;
          setTimeout(resolve, EXIT_LOG_WAIT_MS);
        });
      }
      if (pending.length > 0) writeOutAtExit(pending.join('\n'));
      pending = [];
    },
    get dropped() {
      return dropped;
    },
  };
}

/** The log's view of the events. A record is built only when its level is written: at LOG_LEVEL=warn a
 * request that went well costs no log work at all. */
export function logEvents(log: Logger, minLevel: LogLevel): Events {
  const min = LEVELS[minLevel];
  const debug = LEVELS.debug >= min;
  const info = LEVELS.info >= min;
  return {
    attemptResponded(e) {
      if (debug) {
        log('debug', 'upstream responded', {
          id: e.id,
          route: e.route,
          endpoint: e.endpoint,
          attempt: e.attempt,
          status: e.status,
          upstream_ms: round(e.seconds * 1000),
        });
      }
    },
    attemptFailed(e) {
      const then = e.next.retry ? `retrying in ${e.next.delayMs} ms` : `giving up (${e.next.reason})`;
      log('warn', `attempt ${e.attempt} failed: ${e.error}; ${then}`, {
        id: e.id,
        route: e.route,
        endpoint: e.endpoint,
        attempt: e.attempt,
        kind: e.kind,
        status: e.status,
        ...(e.next.retry ? { retry_in_ms: e.next.delayMs } : { skip: e.next.reason }),
      });
    },
    requestDone(r) {
      const warn = r.status >= 500 || r.rejected !== undefined;
      if (!warn && !info) return;
      // The fields a line has only sometimes are added after, not spread in: an object of one shape, made
      // without copying, is the one JSON.stringify writes fastest.
      const fields: Record<string, unknown> = {
        id: r.id,
        route: r.route,
        method: r.method,
        path: r.path,
        status: r.status,
        attempts: r.attempts,
        endpoint: r.endpoint,
        duration_ms: round(r.durationMs),
        upstream_ms: r.upstreamMs === null ? null : round(r.upstreamMs),
        bytes_in: r.bytesIn,
        bytes_out: r.bytesOut,
      };
      if (r.rejected) fields.rejected = r.rejected;
      if (r.error) fields.error = r.error;
      if (r.closedBy) fields.closed_by = r.closedBy;
      log(warn ? 'warn' : 'info', 'request', fields);
    },
    endpointChanged(e) {
      const fields = {
        route: e.route,
        endpoint: e.endpoint,
        state: e.change === 'opened' ? 'open' : e.change === 'probing' ? 'half-open' : 'closed',
      };
      if (e.change === 'opened') {
        log('warn', `endpoint ${e.endpoint} ejected for ${Math.round(e.openMs ?? 0)} ms`, {
          ...fields,
          open_ms: Math.round(e.openMs ?? 0),
          ejections: e.ejections,
        });
      } else {log(
          'info',
          e.change === 'probing'
            ? `endpoint ${e.endpoint} half-open: sending a probe`
            : `endpoint ${e.endpoint} re-admitted`,
          fields,
        );}
    },
    endpointsChanged(e) {
      if (e.error) {
        log('warn', `discovery failed: ${e.error}; keeping the endpoints known`, {
          route: e.route,
          endpoints: e.endpoints,
        });
      }
      if (e.added.length || e.removed.length) {
        log('info', 'endpoints changed', {
          route: e.route,
          added: e.added,
          removed: e.removed,
          endpoints: e.endpoints,
        });
      }
    },
    tlsReloaded(e) {
      if (e.error) {
        log('warn', `TLS files not taken up: ${e.error}; new connections keep the previous ones`, { route: e.route });
      } else log('notice', 'TLS files changed: new connections use them', { route: e.route });
    },
    memoryPressure(e) {
      const fields = { used_bytes: e.usedBytes, limit_bytes: e.limitBytes, shed_percent: e.percent };
      if (e.shedding) {
        log('warn', `memory near the limit: new requests get 503 until it is back below ${e.percent}%`, fields);
      } else log('notice', "memory back below the limit's share: taking new requests again", fields);
    },
    tunnelOpened(e) {
      if (debug) log('debug', 'websocket tunnel open', { id: e.id, route: e.route, endpoint: e.endpoint });
    },
  };
}

const round = (ms: number) => Math.round(ms * 100) / 100;

// =========================================================================================================
// Metrics: counters and histograms fed by the same events as the log, written out in the Prometheus text
// format (or OpenMetrics when the scraper asks). Names follow Prometheus practice and echo Envoy's
// `upstream_rq_*` and Linkerd's `response_total`, so an operator finds what they expect.
// =========================================================================================================

/** Seconds: from a sub-millisecond loopback hop to a multi-second timeout. */
const BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** A small fixed set of method labels: anything else is `other`, so a client cannot grow the series. */
const METHOD_LABELS = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']);

class Histogram {
  readonly counts = new Array<number>(BUCKETS.length).fill(0);
  sum = 0;
  count = 0;
  observe(seconds: number): void {
    const i = BUCKETS.findIndex((b) => seconds <= b);
    if (i >= 0) this.counts[i]++;
    this.sum += seconds;
    this.count++;
  }
}

/** Live values the metrics read when scraped, rather than keep up to date. */
export interface Gauges {
  inFlight(): number;
  draining(): boolean;
  connections?(): number; // Node only: Deno.serve and Bun.serve do not expose their connections
  upstreams?(): Array<{ route: string; active: number; queued: number; endpoints: readonly Endpoint[] }>;
  now?(): number;
  /** bytes of request bodies kept for replay now */
  replayBytes?(): number;
  /** the process's resident memory and CPU time (`Runtime.usage`) */
  usage?(): { rssBytes: number; cpuSeconds: number };
  /** the memory limit the process runs under (null: none found), and whether it sheds new requests now */
  memory?(): { limitBytes: number | null; shedding: boolean };
  /** PROCESS_MAX_IN_FLIGHT (0: none), and the places held and waited for now; and the CPU limit that helped
   * size them (null: none found) */
  places?(): { max: number; active: number; queued: number; cpuCores: number | null };
  /** log lines dropped since start, stdout not taking them (`batchedLines`) */
  logLinesDropped?(): number;
}

export class Metrics {
  // Keys are label values joined by spaces (route names have none): `${route} ${method} ${code}`.
  readonly requests = new Map<string, number>();
  readonly duration = new Histogram();
  readonly upstreamTime = new Histogram();
  readonly attemptFailures = new Map<string, number>(); // route reason
  readonly retriesSkipped = new Map<string, number>(); // route reason
  readonly retries = new Map<string, number>(); // route
  readonly rejected = new Map<string, number>(); // route reason
  readonly tlsReloads = new Map<string, number>(); // route result
  readonly tunnels = new Map<string, number>(); // route outcome
  readonly tunnelBytes = new Map<string, number>(); // route direction
  tunnelsOpen = 0;
  eventLoopLagSeconds = 0;
  gauges: Gauges = { inFlight: () => 0, draining: () => false };

  readonly info: { version: string; runtime: string; startTimeSeconds: number };

  constructor(info: { version: string; runtime: string; startTimeSeconds: number }) {
    this.info = info;
  }

  events(): Events {
    const add = (map: Map<string, number>, key: string) => map.set(key, (map.get(key) ?? 0) + 1);
    return {
      attemptResponded: (e) => this.upstreamTime.observe(e.seconds),
      attemptFailed: (e) => {
        add(this.attemptFailures, `${e.route} ${e.kind === 'status' ? String(e.status) : e.kind}`);
        if (e.next.retry) add(this.retries, e.route);
        else if (e.next.reason !== 'final') add(this.retriesSkipped, `${e.route} ${e.next.reason}`);
      },
      requestDone: (r) => {
        add(this.requests, `${r.route} ${METHOD_LABELS.has(r.method) ? r.method : 'other'} ${r.status}`);
        if (r.rejected) add(this.rejected, `${r.route} ${r.rejected}`);
        this.duration.observe(r.durationMs / 1000);
        if (r.closedBy) {
          this.tunnelsOpen--;
          this.tunnelBytes.set(
            `${r.route} to_upstream`,
            (this.tunnelBytes.get(`${r.route} to_upstream`) ?? 0) + r.bytesIn,
          );
          this.tunnelBytes.set(`${r.route} to_app`, (this.tunnelBytes.get(`${r.route} to_app`) ?? 0) + r.bytesOut);
        } else if (r.websocket) {
          add(this.tunnels, `${r.route} ${r.rejected ?? (r.upstreamMs === null ? 'failed' : 'refused')}`);
        }
      },
      tunnelOpened: (e) => {
        this.tunnelsOpen++;
        add(this.tunnels, `${e.route} opened`);
      },
      endpointChanged: () => {}, // the breakers' states are read when scraped
      endpointsChanged: () => {},
      tlsReloaded: (e) => add(this.tlsReloads, `${e.route} ${e.error ? 'error' : 'ok'}`),
      memoryPressure: () => {}, // read when scraped
    };
  }

  /** The exposition: Prometheus text format 0.0.4, or OpenMetrics 1.0 (`# EOF`, counter families named
   * without `_total`). */
  render(openMetrics: boolean): string {
    const out: string[] = [];
    const family = (name: string, type: 'counter' | 'gauge' | 'histogram', help: string) => {
      const base = openMetrics && type === 'counter' ? name.replace(/_total$/, '') : name;
      out.push(`# HELP ${base} ${help}`, `# TYPE ${base} ${type}`);
    };
    /** A family of one unlabelled value. */
    const single = (name: string, type: 'counter' | 'gauge', help: string, value: number) => {
      family(name, type, help);
      out.push(`${name} ${value}`);
    };
    const labels = (pairs: Record<string, string>) => {
      const inner = Object.entries(pairs).map(([k, v]) =>
        `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`
      );
      return inner.length ? `{${inner.join(',')}}` : '';
    };
    const histogram = (name: string, h: Histogram) => {
      let cumulative = 0;
      BUCKETS.forEach((b, i) => {
        cumulative += h.counts[i];
        out.push(`${name}_bucket{le="${b}"} ${cumulative}`);
      });
      out.push(`${name}_bucket{le="+Inf"} ${h.count}`, `${name}_sum ${h.sum}`, `${name}_count ${h.count}`);
    };

    const series = (name: string, map: Map<string, number>, names: string[]) => {
      for (const [key, n] of map) {
        const values = key.split(' ');
        out.push(`${name}${labels(Object.fromEntries(names.map((l, i) => [l, values[i]])))} ${n}`);
      }
    };
    family(
      'ambassador_requests_total',
      'counter',
      'Requests answered to the app, by route, method and status code ' +
        '(499: the app went away; route "": no route matched).',
    );
    series('ambassador_requests_total', this.requests, ['route', 'method', 'code']);
    family(
      'ambassador_requests_rejected_total',
      'counter',
      'Requests the ambassador answered itself, by route and reason: ' +
        'no_route (404), rate_limit (429), concurrency, circuit_open, memory, draining (503; ' +
        'draining: a WebSocket handshake during a drain).',
    );
    series('ambassador_requests_rejected_total', this.rejected, ['route', 'reason']);
    family(
      'ambassador_request_duration_seconds',
      'histogram',
      'Time from the request arriving to the end of its response body.',
    );
    histogram('ambassador_request_duration_seconds', this.duration);
    family(
      'ambassador_upstream_response_seconds',
      'histogram',
      "Time from sending an attempt to the upstream's response headers.",
    );
    histogram('ambassador_upstream_response_seconds', this.upstreamTime);
    family(
      'ambassador_upstream_attempt_failures_total',
      'counter',
      'Attempts that failed, by route and reason: ' +
        'refused, dns, reset, timeout, tls, protocol, other, or the 502/503/504 status.',
    );
    series('ambassador_upstream_attempt_failures_total', this.attemptFailures, ['route', 'reason']);
    family('ambassador_upstream_retries_total', 'counter', 'Retries sent to the upstream, by route.');
    series('ambassador_upstream_retries_total', this.retries, ['route']);
    family(
      'ambassador_upstream_retries_skipped_total',
      'counter',
      'Retries that were due but not sent, by route and reason: attempts, method, body, deadline, budget, circuit.',
    );
    series('ambassador_upstream_retries_skipped_total', this.retriesSkipped, ['route', 'reason']);
    const upstreams = this.gauges.upstreams?.() ?? [];
    const now = this.gauges.now?.() ?? 0;
    family(
      'ambassador_upstream_endpoints',
      'gauge',
      'Endpoints known for a route (from its URLs and what their names resolve to).',
    );
    for (const u of upstreams) {
      out.push(`ambassador_upstream_endpoints${labels({ route: u.route })} ${u.endpoints.length}`);
    }
    const perEndpoint = (name: string, type: 'counter' | 'gauge', help: string, value: (e: Endpoint) => number) => {
      family(name, type, help);
      for (const u of upstreams) {
        for (const e of u.endpoints) out.push(`${name}${labels({ route: u.route, endpoint: e.key })} ${value(e)}`);
      }
    };
    family(
      'ambassador_upstream_endpoint_state',
      'gauge',
      'The circuit breaker of each endpoint: 1 for its present state (closed, open: ejected, half_open: probing).',
    );
    for (const u of upstreams) {
      for (const e of u.endpoints) {
        const state = e.breaker.state(now);
        for (const s of ['closed', 'open', 'half-open'] as const) {
          out.push(
            `ambassador_upstream_endpoint_state${
              labels({ route: u.route, endpoint: e.key, state: s.replace('-', '_') })
            } ${state === s ? 1 : 0}`,
          );
        }
      }
    }
    perEndpoint(
      'ambassador_upstream_endpoint_ejections_total',
      'counter',
      'Times an endpoint was ejected by its circuit breaker.',
      (e) => e.breaker.ejectionsTotal,
    );
    perEndpoint(
      'ambassador_upstream_endpoint_requests_total',
      'counter',
      'Attempts sent to each endpoint.',
      (e) => e.requests,
    );
    perEndpoint(
      'ambassador_upstream_endpoint_in_flight',
      'gauge',
      'Attempts waiting on each endpoint for response headers.',
      (e) => e.inFlight,
    );
    family(
      'ambassador_upstream_active_requests',
      'gauge',
      "Requests holding a place under a route's concurrency limit (MAX_IN_FLIGHT).",
    );
    for (const u of upstreams) out.push(`ambassador_upstream_active_requests${labels({ route: u.route })} ${u.active}`);
    family(
      'ambassador_upstream_queued_requests',
      'gauge',
      "Requests waiting for a place under a route's concurrency limit (QUEUE_SIZE).",
    );
    for (const u of upstreams) out.push(`ambassador_upstream_queued_requests${labels({ route: u.route })} ${u.queued}`);
    family(
      'ambassador_tls_reloads_total',
      'counter',
      "Changes to a route's TLS files: ok (taken up) or error (the previous ones kept).",
    );
    series('ambassador_tls_reloads_total', this.tlsReloads, ['route', 'result']);
    if (this.gauges.replayBytes) {
      single(
        'ambassador_retry_body_bytes',
        'gauge',
        'Bytes of request bodies kept in memory for replay now (at most RETRY_BODIES_MAX_BYTES).',
        this.gauges.replayBytes(),
      );
    }
    const memory = this.gauges.memory?.();
    if (memory) {
      if (memory.limitBytes !== null) {
        single(
          'ambassador_memory_limit_bytes',
          'gauge',
          "The memory limit the process runs under (its cgroup's).",
          memory.limitBytes,
        );
      }
      single(
        'ambassador_memory_shedding',
        'gauge',
        '1 while new requests get 503 near the memory limit (MEMORY_SHED_PERCENT).',
        memory.shedding ? 1 : 0,
      );
    }
    const places = this.gauges.places?.();
    if (places && places.cpuCores !== null) {
      single(
        'ambassador_cpu_limit_cores',
        'gauge',
        "The CPU limit the process runs under, in cores (its cgroup's, or CPU_LIMIT_MILLICORES).",
        places.cpuCores,
      );
    }
    if (places && places.max > 0) {
      single(
        'ambassador_process_max_in_flight',
        'gauge',
        'Requests in flight in all at most (PROCESS_MAX_IN_FLIGHT, or from the memory and CPU limits).',
        places.max,
      );
      single(
        'ambassador_process_in_flight_requests',
        'gauge',
        'Requests holding one of those places now: waiting for their answer, or passing on a long body.',
        places.active,
      );
      single(
        'ambassador_process_queued_requests',
        'gauge',
        'Requests waiting for one of those places now.',
        places.queued,
      );
    }
    single('ambassador_websocket_tunnels_open', 'gauge', 'WebSocket tunnels open now.', this.tunnelsOpen);
    family(
      'ambassador_websocket_tunnels_total',
      'counter',
      'WebSocket handshakes by route and outcome: opened (the upstream answered 101), refused (it answered ' +
        'another status, passed on to the app), failed (no answer: 502 or 504), or the reason the ambassador ' +
        'turned it away itself (circuit_open, concurrency, memory, draining, rate_limit).',
    );
    series('ambassador_websocket_tunnels_total', this.tunnels, ['route', 'outcome']);
    family(
      'ambassador_websocket_bytes_total',
      'counter',
      'Bytes through closed WebSocket tunnels, frames included, by route and direction (to_upstream, to_app).',
    );
    series('ambassador_websocket_bytes_total', this.tunnelBytes, ['route', 'direction']);
    single('ambassador_requests_in_flight', 'gauge', 'Requests not yet answered in full.', this.gauges.inFlight());
    if (this.gauges.connections) {
      single('ambassador_downstream_connections', 'gauge', 'Open connections from the app.', this.gauges.connections());
    }
    single('ambassador_draining', 'gauge', '1 from the moment a drain starts.', this.gauges.draining() ? 1 : 0);
    single(
      'ambassador_event_loop_lag_seconds',
      'gauge',
      'How late the last event-loop timer fired.',
      this.eventLoopLagSeconds,
    );
    if (this.gauges.logLinesDropped) {
      single(
        'ambassador_log_lines_dropped_total',
        'counter',
        'Log lines not written: stdout was not taking them, and the text waiting was at its bound (1 MiB).',
        this.gauges.logLinesDropped(),
      );
    }
    family('ambassador_build_info', 'gauge', 'Always 1; the labels say which build and runtime this is.');
    out.push(`ambassador_build_info${labels({ version: this.info.version, runtime: this.info.runtime })} 1`);
    const usage = this.gauges.usage?.();
    if (usage) {
      single('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.', usage.rssBytes);
      single('process_cpu_seconds_total', 'counter', 'User and system CPU time spent, in seconds.', usage.cpuSeconds);
    }
    single(
      'process_start_time_seconds',
      'gauge',
      'Start time of the process since the Unix epoch, in seconds.',
      this.info.startTimeSeconds,
    );
    if (openMetrics) out.push('# EOF');
    return out.join('\n') + '\n';
  }
}

function fanOut(...all: Events[]): Events {
  return {
    attemptResponded: (e) => all.forEach((x) => x.attemptResponded(e)),
    attemptFailed: (e) => all.forEach((x) => x.attemptFailed(e)),
    requestDone: (e) => all.forEach((x) => x.requestDone(e)),
    endpointChanged: (e) => all.forEach((x) => x.endpointChanged(e)),
    endpointsChanged: (e) => all.forEach((x) => x.endpointsChanged(e)),
    tlsReloaded: (e) => all.forEach((x) => x.tlsReloaded(e)),
    memoryPressure: (e) => all.forEach((x) => x.memoryPressure(e)),
    tunnelOpened: (e) => all.forEach((x) => x.tunnelOpened(e)),
  };
}

// =========================================================================================================
// Configuration: parsed once, by a pure function, into a frozen object — or one error naming every bad
// setting where it was set (its environment variable, or the routes file and the field), its value and
// what was expected.
// =========================================================================================================

export class ConfigError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.problems = problems;
    this.name = 'ConfigError';
  }
}

/** Reads a small text file (the routes file, a certificate): main passes the runtime's own. */
export type ReadFile = (path: string) => string;

/** Where a setting was set: its environment variable, or a field of the routes file (`routes[1].retryAttempts`). */
type Place = { variable: string } | { file: string; field: string };

/** Every problem found, each said the same way for its kind of place:
 *   `RETRY_ATTEMPTS="three": expected a whole number from 1 to 100`
 *   `ROUTES_FILE="/etc/routes.json": routes[1].retryAttempts: expected a whole number from 1 to 100, got 0` */
class Problems {
  readonly list: string[] = [];

  add(place: Place, value: unknown, expected: string): void {
    this.together([[place, value]], expected);
  }

  /** One problem of several settings at once (two TLS files that do not belong together). */
  together(settings: Array<[Place, unknown]>, expected: string): void {
    const [first] = settings[0];
    if ('variable' in first) {
      const named = settings.map(([place, value]) =>
        `${placeName(place)}=${JSON.stringify(typeof value === 'string' ? value : JSON.stringify(value))}`
      );
      this.say(`${named.join(', ')}: expected ${expected}`);
    } else {
      const got = settings.map(([, value]) => JSON.stringify(value) ?? 'nothing').join(', ');
      this.say(
        `ROUTES_FILE=${JSON.stringify(first.file)}: ${
          settings.map(([place]) => placeName(place)).join(', ')
        }: expected ${expected}, got ${got}`,
      );
    }
  }

  /** A problem that is no one value's (a variable that must be set and is not). */
  say(text: string): void {
    if (!this.list.includes(text)) this.list.push(text); // a default every route shares is one problem
  }

  check(): void {
    if (this.list.length > 0) throw new ConfigError(this.list);
  }
}

/** A place as a message names it: the variable, or the field. */
function placeName(place: Place): string {
  return 'variable' in place ? place.variable : place.field;
}

const TLS_VARIABLES = {
  caFile: 'UPSTREAM_CA_FILE',
  certFile: 'UPSTREAM_CERT_FILE',
  keyFile: 'UPSTREAM_KEY_FILE',
  serverName: 'UPSTREAM_SERVER_NAME',
  minVersion: 'UPSTREAM_TLS_MIN_VERSION',
} as const;
const ROUTE_KEYS = ['name', 'host', 'prefix', 'stripPrefix', 'upstream', 'tls', ...ROUTE_SETTINGS.map((s) => s.key)];
const ROUTE_KEY_SET = new Set(ROUTE_KEYS);
const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
const HOSTNAME = /^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$/;
/** A path of RFC 3986 `pchar`s and slashes (percent-encoding well formed), as a route prefix must be. */
const PREFIX = /^(\/([A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)+$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const WILDCARD = new Set(['0.0.0.0', '::', '0:0:0:0:0:0:0:0']);

/** An address to listen on: an IPv4 or IPv6 literal, or `localhost`. */
function isListenAddress(host: string): boolean {
  if (host === 'localhost' || IPV4.test(host)) return true;
  if (!/^[0-9A-Fa-f:.]+$/.test(host) || !host.includes(':')) return false;
  try {
    return new URL(`http://${bracketed(host)}/`).hostname !== '';
  } catch {
    return false;
  }
}

const range = (min: number, max: number) =>
  `a whole number from ${min} to ${max === Number.MAX_SAFE_INTEGER ? 'any size' : max}`;

/** The configuration, from the environment and, when ROUTES_FILE names one, a routes file:
 *
 *   {"routes": [
 *     {"name": "inventory", "prefix": "/inventory", "upstream": "http://inventory:9000", "stripPrefix": true},
 *     {"name": "payments", "prefix": "/payments", "host": "shop.local",
 *      "upstream": ["https://p1:8443", "https://p2:8443"],
 *      "retryAttempts": 1, "tls": {"caFile": "/tls/ca.crt", "certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"}}
 *   ]}
 *
 * A route may set any key of ROUTE_SETTINGS; what it leaves out comes from that setting's variable. */
export function loadConfig(env: Record<string, string | undefined>, readFile?: ReadFile): Config {
  const problems = new Problems();
  const read = (name: string) => {
    const v = env[name];
    return v === undefined || v.trim() === '' ? undefined : v.trim();
  };
  const int = (name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER) => {
    const v = read(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) {
      problems.add({ variable: name }, v, range(min, max));
      return fallback;
    }
    return n;
  };
  const oneOf = <T extends string>(name: string, fallback: T, allowed: readonly T[]): T => {
    const v = read(name);
    if (v === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(v.toLowerCase())) {
      problems.add({ variable: name }, v, `one of ${allowed.join(', ')}`);
      return fallback;
    }
    return v.toLowerCase() as T;
  };
  const address = (name: string, fallback: string) => {
    const v = read(name);
    if (v === undefined) return fallback;
    if (!isListenAddress(v)) {
      problems.add(
        { variable: name },
        v,
        'an IP address of this machine to listen on (127.0.0.1, ::1, 0.0.0.0, ::, a pod IP) or localhost',
      );
    }
    return v;
  };

  const defaults = {} as Record<string, number>;
  for (const s of ROUTE_SETTINGS) defaults[s.key] = int(s.env, s.fallback, s.min, 'max' in s ? s.max : undefined);

  const routesFile = read('ROUTES_FILE') ?? null;
  let routes: Route[] = [];
  if (routesFile === null) {
    const raw = read('UPSTREAM_URL');
    if (raw === undefined) {
      problems.say(
        'UPSTREAM_URL is not set: expected the upstream base URL, e.g. http://inventory-service:9000 (or ROUTES_FILE)',
      );
    } else {
      const upstreams = upstreamsOf(raw.split(',').map((v) => v.trim()), { variable: 'UPSTREAM_URL' }, raw, problems);
      const tlsRaw = Object.fromEntries(Object.entries(TLS_VARIABLES).map(([key, name]) => [key, read(name)]));
      const tls = tlsOf(tlsRaw, (key) => ({ variable: TLS_VARIABLES[key] }), upstreams, readFile, problems);
      const route: Route = {
        ...(defaults as RouteSettings),
        name: 'default',
        host: null,
        prefix: '/',
        stripPrefix: false,
        upstreams,
        tls,
        source: null,
      };
      settingsAgree(route, (s) => ({ variable: s.env }), problems);
      routes = [route];
    }
  } else {
    for (const name of ['UPSTREAM_URL', ...Object.values(TLS_VARIABLES)]) {
      const v = read(name);
      if (v !== undefined) {
        problems.add(
          { variable: name },
          v,
          'nothing when ROUTES_FILE is set: each route names its upstream and TLS files',
        );
      }
    }
    routes = routesFromFile(routesFile, defaults as RouteSettings, readFile, problems);
  }

  const config: Config = {
    host: address('HOST', '127.0.0.1'),
    port: int('PORT', 8080, 0, 65535),
    adminHost: address('ADMIN_HOST', '0.0.0.0'),
    adminPort: int('ADMIN_PORT', 9901, 0, 65535),
    drainTimeoutMs: int('DRAIN_TIMEOUT_MS', 20000, 0, MAX_TIMER_MS),
    drainGraceMs: int('DRAIN_GRACE_MS', 0, 0, MAX_TIMER_MS),
    bodyIdleTimeoutMs: int('BODY_IDLE_TIMEOUT_MS', 300_000, 0, MAX_TIMER_MS),
    replayMemoryBytes: int('RETRY_BODIES_MAX_BYTES', 8 * 1024 * 1024, 0),
    memoryShedPercent: int('MEMORY_SHED_PERCENT', 90, 0, 100),
    memoryLimitBytes: int('MEMORY_LIMIT_BYTES', 0, 0),
    cpuLimitMillicores: int('CPU_LIMIT_MILLICORES', 0, 0),
    processMaxInFlight: read('PROCESS_MAX_IN_FLIGHT') === undefined ? null : int('PROCESS_MAX_IN_FLIGHT', 0, 0),
    queueNewestFirstMs: int('QUEUE_NEWEST_FIRST_MS', 1000, 0, MAX_TIMER_MS),
    logFormat: oneOf<LogFormat>('LOG_FORMAT', 'json', ['json', 'text']),
    logLevel: oneOf<LogLevel>('LOG_LEVEL', 'info', ['debug', 'info', 'warn', 'error']),
    schedPolicy: oneOf<SchedPolicy>('SCHED_POLICY', 'normal', ['normal', 'batch']),
    routesFile,
    // Most specific first, so the order of the file never hides a route behind a shorter prefix.
    routes: Object.freeze(
      routes.map((r) =>
        Object.freeze({
          ...r,
          // A rate with no burst given may burst to one second's worth.
          rateLimitBurst: r.rateLimitPerSec > 0 && r.rateLimitBurst === 0 ? r.rateLimitPerSec : r.rateLimitBurst,
        })
      ).sort((a, b) => Number(b.host !== null) - Number(a.host !== null) || b.prefix.length - a.prefix.length),
    ),
  };
  // The same port twice clashes on one address, and on any address when either listens on all of them.
  if (
    config.port !== 0 && config.port === config.adminPort &&
    (config.host === config.adminHost || WILDCARD.has(config.host) || WILDCARD.has(config.adminHost))
  ) {
    problems.add(
      { variable: 'ADMIN_PORT' },
      config.adminPort,
      `a port other than PORT (${config.port}), since ADMIN_HOST=${JSON.stringify(config.adminHost)} and HOST=${
        JSON.stringify(config.host)
      } overlap`,
    );
  }
  problems.check();
  return Object.freeze(config);
}

/** Routes from a JSON file; every problem names the route and field, e.g. `routes[1].retryAttempts`. */
function routesFromFile(
  file: string,
  defaults: RouteSettings,
  readFile: ReadFile | undefined,
  problems: Problems,
): Route[] {
  let doc: unknown;
  try {
    if (!readFile) throw new Error('files cannot be read here');
    doc = JSON.parse(readFile(file));
  } catch (err) {
    problems.add({ variable: 'ROUTES_FILE' }, file, `a readable JSON file (${describeFailure(err)})`);
    return [];
  }
  const at = (field: string): Place => ({ file, field });
  const list = (doc as { routes?: unknown })?.routes;
  if (!Array.isArray(list) || list.length === 0) {
    problems.add(
      at('routes'),
      list,
      'a non-empty array of routes, as in {"routes": [{"name": ..., "prefix": ..., "upstream": ...}]}',
    );
    return [];
  }
  const out: Route[] = [];
  const names = new Set<string>();
  const places = new Set<string>(); // `${host} ${prefix}`
  list.forEach((r: Record<string, unknown>, i) => {
    const source = `routes[${i}]`;
    const f = (key: string) => at(`${source}.${key}`);
    if (typeof r !== 'object' || r === null || Array.isArray(r)) return problems.add(at(source), r, 'an object');
    for (const key of Object.keys(r)) {
      if (!ROUTE_KEY_SET.has(key)) problems.add(f(key), r[key], `no such field: one of ${ROUTE_KEYS.join(', ')}`);
    }
    const name = typeof r.name === 'string' && NAME.test(r.name)
      ? r.name
      : (problems.add(f('name'), r.name, 'a name of letters, digits, _ . -'), `route${i}`);
    let prefix = '/';
    // A prefix is compared with the request's path as sent (percent-encoded, dot segments resolved), so
    // one that is not in that form could never match.
    if (
      typeof r.prefix !== 'string' || !PREFIX.test(r.prefix) ||
      (r.prefix.length > 1 && normalizePath(r.prefix) !== r.prefix)
    ) {
      problems.add(
        f('prefix'),
        r.prefix,
        'a path prefix starting with /, percent-encoded as a request would send it, without . or .. segments',
      );
    } else prefix = r.prefix.length > 1 ? r.prefix.replace(/\/+$/, '') || '/' : '/';
    let host: string | null = null;
    if (r.host !== undefined) {
      if (typeof r.host === 'string' && HOSTNAME.test(r.host)) host = r.host.toLowerCase();
      else problems.add(f('host'), r.host, "a host name without port, matched against the request's Host");
    }
    if (r.stripPrefix !== undefined && typeof r.stripPrefix !== 'boolean') {
      problems.add(f('stripPrefix'), r.stripPrefix, 'true or false');
    }
    const given = typeof r.upstream === 'string' ? [r.upstream] : r.upstream;
    let upstreams: URL[] = [];
    if (!Array.isArray(given) || given.length === 0 || !given.every((u) => typeof u === 'string')) {
      problems.add(f('upstream'), r.upstream, 'an upstream base URL, or an array of them');
    } else {
      upstreams = upstreamsOf(given, f('upstream'), r.upstream, problems);
    }
    const settings: Record<string, number> = {};
    for (const s of ROUTE_SETTINGS) {
      const v = r[s.key];
      const max = 'max' in s ? s.max : Number.MAX_SAFE_INTEGER;
      if (v === undefined) settings[s.key] = defaults[s.key];
      else if (typeof v === 'number' && Number.isSafeInteger(v) && v >= s.min && v <= max) settings[s.key] = v;
      else (problems.add(f(s.key), v, range(s.min, max)), (settings[s.key] = defaults[s.key]));
    }
    let tls: TlsFiles | null = null;
    if (r.tls !== undefined) {
      if (typeof r.tls !== 'object' || r.tls === null || Array.isArray(r.tls)) {
        problems.add(f('tls'), r.tls, 'an object with caFile, certFile, keyFile, serverName, minVersion');
      } else {
        const given = r.tls as Record<string, unknown>;
        for (const key of Object.keys(given)) {
          if (!(key in TLS_VARIABLES)) {
            problems.add(f(`tls.${key}`), given[key], `no such field: one of ${Object.keys(TLS_VARIABLES).join(', ')}`);
          }
        }
        tls = tlsOf(given, (key) => f(`tls.${key}`), upstreams, readFile, problems);
      }
    }
    if (names.has(name)) problems.add(f('name'), name, 'a name no other route has');
    if (places.has(`${host} ${prefix}`)) {
      problems.add(f('prefix'), r.prefix, `a prefix and host no other route has (${host ?? 'any host'} ${prefix})`);
    }
    names.add(name);
    places.add(`${host} ${prefix}`);
    const route: Route = {
      ...(settings as RouteSettings),
      name,
      host,
      prefix,
      stripPrefix: r.stripPrefix === true,
      upstreams,
      tls,
      source,
    };
    // A setting the route leaves out is its variable's: a problem with it names that variable.
    settingsAgree(route, (s) => (r[s.key] === undefined ? { variable: s.env } : f(s.key)), problems);
    out.push(route);
  });
  return out;
}

/** Settings that must agree with one another: each cap at least its base. */
function settingsAgree(route: Route, placeOf: (s: (typeof ROUTE_SETTINGS)[number]) => Place, problems: Problems): void {
  const setting = (key: keyof RouteSettings) => ROUTE_SETTINGS.find((s) => s.key === key)!;
  for (const [cap, base] of [['retryBackoffMaxMs', 'retryBackoffMs'], ['breakerOpenMaxMs', 'breakerOpenMs']] as const) {
    if (route[cap] < route[base]) {
      problems.add(
        placeOf(setting(cap)),
        route[cap],
        `a value at least ${placeName(placeOf(setting(base)))} (${route[base]})`,
      );
    }
  }
}

/** One or more upstream base URLs, each http:// or https:// with a host and nothing that would leak into
 * logs (credentials) or be silently dropped (query, fragment). */
function upstreamsOf(values: string[], place: Place, given: unknown, problems: Problems): URL[] {
  const expected = 'http:// or https:// URLs (comma-separated) with a host and no credentials, query or fragment';
  const urls: URL[] = [];
  for (const value of values) {
    let u: URL | undefined;
    try {
      u = new URL(value);
    } catch { /* reported below */ }
    // `new URL` reads a bare trailing `?` or `#` as empty, so the raw text is checked for them too.
    if (
      !u || (u.protocol !== 'http:' && u.protocol !== 'https:') || !u.hostname || u.username || u.password ||
      /[?#]/.test(value)
    ) {
      problems.add(place, given, expected);
      return [];
    }
    if (u.port === '0') {
      problems.add(place, given, 'a port from 1 to 65535 (0 is no port to connect to)');
      return [];
    }
    if (urls.some((other) => other.host === u.host)) {
      problems.add(place, given, `each host:port once (${u.host} is named twice)`);
      return [];
    }
    urls.push(u);
  }
  if (urls.length === 0) problems.add(place, given, expected);
  return urls;
}

/** TLS settings: each file must be readable and hold PEM; a client certificate needs its key. */
function tlsOf(
  raw: Partial<Record<keyof TlsFiles, unknown>>,
  placeOf: (key: keyof TlsFiles) => Place,
  upstreams: URL[],
  readFile: ReadFile | undefined,
  problems: Problems,
): TlsFiles | null {
  if (Object.values(raw).every((v) => v === undefined)) return null;
  const text = (key: keyof TlsFiles): string | null => {
    const v = raw[key];
    if (v === undefined) return null;
    if (typeof v !== 'string' || v.trim() === '') return problems.add(placeOf(key), v, 'a non-empty string'), null;
    return v.trim();
  };
  const file = (key: 'caFile' | 'certFile' | 'keyFile', kind: string): string | null => {
    const path = text(key);
    if (path === null) return null;
    if (!readFile) return problems.add(placeOf(key), path, 'a file, but files cannot be read here'), null;
    try {
      if (!readFile(path).includes('-----BEGIN ')) problems.add(placeOf(key), path, `a PEM file holding ${kind}`);
    } catch (err) {
      problems.add(placeOf(key), path, `a readable file holding ${kind} (${describeFailure(err)})`);
    }
    return path;
  };
  const tls: TlsFiles = {
    caFile: file('caFile', 'CA certificates'),
    certFile: file('certFile', 'a certificate chain'),
    keyFile: file('keyFile', 'a private key'),
    serverName: text('serverName'),
    minVersion: (text('minVersion') ?? 'TLSv1.2') as TlsFiles['minVersion'],
  };
  if ((tls.certFile === null) !== (tls.keyFile === null)) {
    const missing = tls.certFile === null ? 'certFile' : 'keyFile';
    problems.add(
      placeOf(missing),
      '',
      `a file as well: a client certificate needs both ${placeName(placeOf('certFile'))} and ${
        placeName(placeOf('keyFile'))
      }`,
    );
  }
  if (tls.serverName !== null && !HOSTNAME.test(tls.serverName)) {
    problems.add(placeOf('serverName'), tls.serverName, 'a DNS name');
  }
  if (tls.minVersion !== 'TLSv1.2' && tls.minVersion !== 'TLSv1.3') {
    problems.add(placeOf('minVersion'), tls.minVersion, 'TLSv1.2 or TLSv1.3');
  }
  if (upstreams.some((u) => u.protocol !== 'https:')) {
    problems.add(
      placeOf('caFile'),
      raw.caFile ?? raw.certFile ?? raw.serverName ?? raw.minVersion,
      'TLS settings only with https:// upstreams',
    );
  }
  return tls;
}

/** Where a route's TLS setting was set: its variable, or its field in the routes file. */
function tlsPlace(config: Config, route: Route, key: keyof TlsFiles): Place {
  return route.source === null || config.routesFile === null
    ? { variable: TLS_VARIABLES[key] }
    : { file: config.routesFile, field: `${route.source}.tls.${key}` };
}

/** What the configuration asks of the runtime, checked at start: it can set the scheduling policy SCHED_POLICY
 * asks for, its upstream client can do what each route's TLS settings say (`Runtime.tlsLimits`), and its TLS
 * stack takes each route's files together (a key that is not its certificate's stops the process here, naming
 * the files, instead of failing every connection later). */
export function checkRuntime(
  config: Config,
  runtime: Pick<Runtime, 'name' | 'readFile' | 'checkTls' | 'tlsLimits' | 'scheduleBatch'>,
): void {
  const problems = new Problems();
  if (config.schedPolicy === 'batch' && !runtime.scheduleBatch) {
    problems.add(
      { variable: 'SCHED_POLICY' },
      'batch',
      `normal on ${runtime.name}, which has no way to set a thread's scheduling policy (batch is for Bun)`,
    );
  }
  const limits = runtime.tlsLimits;
  for (const r of config.routes) {
    if (!r.tls) continue;
    if (limits && !limits.serverName && r.tls.serverName) {
      problems.add(
        tlsPlace(config, r, 'serverName'),
        r.tls.serverName,
        `nothing on ${limits.runtime}, whose ${limits.client} always verifies the URL's own host name ` +
          '(use Node, or name the upstream by that name)',
      );
    }
    if (limits && r.tls.minVersion === 'TLSv1.3') {
      problems.add(
        tlsPlace(config, r, 'minVersion'),
        'TLSv1.3',
        `TLSv1.2 on ${limits.runtime}, whose ${limits.client} offers TLS 1.2 and 1.3 ` +
          'and cannot be held to 1.3 (use Node)',
      );
    }
    try {
      readTls(r.tls, runtime.readFile, runtime.checkTls);
    } catch (err) {
      const files = (['caFile', 'certFile', 'keyFile'] as const).filter((k) => r.tls![k] !== null);
      problems.together(
        files.map((k) => [tlsPlace(config, r, k), r.tls![k]]),
        `TLS files that can be used together (${describeFailure(err)})`,
      );
    }
  }
  problems.check();
}

// =========================================================================================================
// Runtimes: what differs between Node, Deno and Bun — the server the app talks to, the client to the
// upstream, the resolver, files, TLS, signals — each behind one `Runtime` object chosen once by main. The
// next runtime is one more of these.
// =========================================================================================================

interface Runtime {
  readonly name: RuntimeName;
  /** the upstream client */
  readonly send: Send;
  /** the client for WebSocket handshakes: node:http's, whose 101 hands over the connection (`nodeSend`) */
  readonly upgrade: Send;
  readonly resolve: Resolve;
  readonly readFile: ReadFile;
  /** tries TLS material on the runtime's own TLS stack */
  readonly checkTls: CheckTls;
  /** whether an https:// upstream may be reached at an address discovery found (Deno's fetch cannot verify a
   * certificate's name while connecting to an address: there it goes by name) */
  readonly tlsByAddress: boolean;
  /** what its upstream client cannot do with TLS, refused at start (`checkRuntime`); null: nothing */
  readonly tlsLimits: TlsLimits | null;
  /** the process's resident memory and CPU time, for the metrics */
  usage(): { rssBytes: number; cpuSeconds: number };
  env(): Record<string, string | undefined>;
  /** writes log lines (without their last line end) to stdout, never waiting for it; `written` once the
   * system has taken them, or with `failed` once they cannot be (stdout closed): never an error thrown or emitted */
  writeOut(text: string, written: (failed?: boolean) => void): void;
  /** the same at exit, where the runtime would not finish a write still out (Deno); absent: `writeOut` */
  writeOutAtExit?(text: string): void;
  /** the cgroup memory the process runs under (`cgroupMemory`), or null */
  memory(): CgroupMemory | null;
  /** the cgroup CPU limit the process runs under, in cores (`cgroupCpu`), or null */
  cpu(): number | null;
  /** puts every thread of the process under SCHED_BATCH, and with them every thread they start later; throws
   * why not. Absent where the runtime has no way to ask the system (Node, Deno). */
  scheduleBatch?(): void;
  /** serves the proxy app on host:port, each request handed over as an `AppRequest` */
  listen(handler: ProxyHandler, host: string, port: number, work: Work): Promise<Listener>;
  onSignal(signal: string, f: () => void): void;
  exit(code: number): never;
}

type RuntimeName = 'node' | 'deno' | 'bun';

/** What a runtime's upstream client cannot do with TLS: `serverName` false, verify a name other than the
 * URL's own; and neither fetch client can be held to TLS 1.3 only. */
interface TlsLimits {
  runtime: string;
  client: string;
  serverName: boolean;
}

/** The proxy app's `fetch`: the runtime's own request, and the same request as an `AppRequest` (Hono's `env`). */
type ProxyHandler = (req: Request, app: AppRequest) => Response | Promise<Response>;

interface Listener {
  port: number;
  /** How long it must go on accepting, every answer saying close, before `close` can stop it without
   * cutting off a request already on its way (Deno's and Bun's servers close idle connections the moment
   * they stop accepting); 0 where it stops accepting at once and closes connections only once idle. */
  settleMs: number;
  /** Stops accepting; closes each connection once it has had no request for DRAIN_IDLE_MS; resolves once
   * every connection has ended. */
  close(): Promise<void>;
  /** Ends every connection now. */
  cutOff(): void;
  /** Open connections, where the runtime tells. */
  connections?(): number;
}

/** What a listener's drain waits on: request bodies still arriving, and requests not yet answered. */
interface Work {
  uploadsRead(): Promise<void>;
  inFlight(): number;
  /** A failure no part of the proxy app answered, said in the log (the app still gets a 500 or a cut connection). */
  failed(error: string): void;
  /** What the server refused outright, said in the log. */
  warn(message: string): void;
}

/** During a drain, a connection is closed once it has carried no request this long: a request sent just
 * as the one before it was answered is still read and answered (with `Connection: close`), where closing
 * every idle connection at once resets it (Envoy's drain does the same). */
const DRAIN_IDLE_MS = 1000;

/** The runtime this file runs on, told once, here: Bun first (it has `process` too, and would pass for Node). */
type Host = { name: 'node' } | { name: 'deno'; deno: DenoLike } | { name: 'bun'; bun: BunLike };
const HOST: Host = (() => {
  const g = globalThis as { Deno?: DenoLike; Bun?: BunLike };
  return g.Bun ? { name: 'bun', bun: g.Bun } : g.Deno ? { name: 'deno', deno: g.Deno } : { name: 'node' };
})();

function runtimeOf(host: Host): Promise<Runtime> {
  switch (host.name) {
    case 'bun':
      return bunRuntime(host.bun);
    case 'deno':
      return Promise.resolve(denoRuntime(host.deno));
    default:
      return nodeRuntime();
  }
}

/** Resident memory and CPU time from `process`, which all three runtimes have. */
function processUsage(): { rssBytes: number; cpuSeconds: number } {
  const cpu = process.cpuUsage();
  return { rssBytes: process.memoryUsage.rss(), cpuSeconds: (cpu.user + cpu.system) / 1e6 };
}

/** The memory of the cgroup the process runs in: its limit, and what it uses that the kernel cannot take back
 * under pressure, its anonymous memory (heaps, buffers). File pages (the runtime's own binary, mapped) are
 * given back before anything is killed, so they are not counted: counted, they held Node's group at its limit
 * in normal work. Nor is the process's resident size: it counts shared pages charged elsewhere. */
export interface CgroupMemory {
  readonly limitBytes: number;
  used(): number;
}

/** The directories where the cgroup the process runs in keeps a controller's files, most likely first: the
 * path `/proc/self/cgroup` gives under `root` (v2's one hierarchy, or v1's for `controller`, mounted under
 * the name of the controllers it shares a hierarchy with, e.g. `cpu,cpuacct`), then `root` itself, where a
 * container sees its own group. (Deno reads neither without --allow-all: `cgroupRefused`.) */
function cgroupDirs(readFile: ReadFile, root: string, controller: string): Array<{ dir: string; v2: boolean }> {
  const dirs: Array<{ dir: string; v2: boolean }> = [];
  let lines = '';
  try {
    lines = readFile('/proc/self/cgroup');
  } catch { /* the container's view below */ }
  for (const line of lines.split('\n')) {
    // hierarchy-id:controllers:path; v2's one line has no controllers.
    const first = line.indexOf(':');
    const second = line.indexOf(':', first + 1);
    if (first < 0 || second < 0) continue;
    const controllers = line.slice(first + 1, second);
    const path = line.slice(second + 1).replace(/\/$/, '');
    if (controllers === '') dirs.push({ dir: `${root}${path}`, v2: true });
    else if (controllers.split(',').includes(controller)) {
      dirs.push({ dir: `${root}/${controllers}${path}`, v2: false });
    }
  }
  dirs.push({ dir: root, v2: true }, { dir: `${root}/${controller}`, v2: false });
  return dirs;
}

/** Why the process may not read the cgroup it runs in, where its runtime refuses: Deno 2 lets no program read
 * under /proc/self or /sys without --allow-all, whatever --allow-read says (denoland/deno#27564), so under
 * Deno the ambassador finds neither limit by itself, in a container or out of one. Undefined where the file
 * could be read, or is simply not there (no cgroups): then a limit not found is a limit not set. */
export function cgroupRefused(readFile: ReadFile): string | undefined {
  try {
    readFile('/proc/self/cgroup');
  } catch (err) {
    const name = (err as { name?: unknown }).name;
    if (name === 'NotCapable' || name === 'PermissionDenied') return describeFailure(err);
  }
  return undefined;
}

/** The cgroup memory the process runs under (v2: `memory.max` and `anon` in `memory.stat`; v1:
 * `memory.limit_in_bytes` and `total_rss`), in the first of `cgroupDirs` that has it; null where no limit
 * is set or none can be read. Every runtime reads it with its own `readFile`. */
export function cgroupMemory(readFile: ReadFile, root = '/sys/fs/cgroup'): CgroupMemory | null {
  for (const { dir, v2 } of cgroupDirs(readFile, root, 'memory')) {
    let text: string;
    try {
      text = readFile(`${dir}/${v2 ? 'memory.max' : 'memory.limit_in_bytes'}`).trim();
    } catch {
      continue;
    }
    // `max` (v2), or v1's "no limit", a number near 2^63.
    const limitBytes = Number(text);
    if (text === 'max' || !Number.isSafeInteger(limitBytes) || limitBytes <= 0) return null;
    const name = v2 ? 'anon' : 'total_rss';
    const anon = new RegExp(`^${name} (\\d+)$`, 'm');
    return {
      limitBytes,
      used: () => {
        const found = anon.exec(readFile(`${dir}/memory.stat`));
        if (!found) throw new Error(`no ${name} in ${dir}/memory.stat`);
        return Number(found[1]);
      },
    };
  }
  return null;
}

/** The CPU limit of the cgroup the process runs under, in cores (a Kubernetes limit of 100m is 0.1): v2's
 * `cpu.max` (quota and period), v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us`, in the first of
 * `cgroupDirs` that has them; null where no limit is set or none can be read. */
export function cgroupCpu(readFile: ReadFile, root = '/sys/fs/cgroup'): number | null {
  for (const { dir, v2 } of cgroupDirs(readFile, root, 'cpu')) {
    let quota: string, period: string;
    try {
      [quota, period] = v2
        ? readFile(`${dir}/cpu.max`).trim().split(/\s+/)
        : [readFile(`${dir}/cpu.cfs_quota_us`).trim(), readFile(`${dir}/cpu.cfs_period_us`).trim()];
    } catch {
      continue;
    }
    const cores = Number(quota) / Number(period); // `max` (v2) or -1 (v1): no limit
    return Number.isFinite(cores) && cores > 0 ? cores : null;
  }
  return null;
}

/** A request our own client will not make (a method or a header it refuses): the app's request is at
 * fault, and nothing was sent. */
function unsendable(err: unknown): ClientError {
  return new ClientError(400, `the request cannot be sent: ${describeFailure(err)}`);
}

// --- Node: node:http for the app and to the upstream, Node's resolver ------------------------------------

/** The parts of Node's streams the Node path uses, so this file needs no Node types. */
export interface NodeReadable extends AsyncIterable<Uint8Array> {
  /** the whole body has been read from the connection (Node's IncomingMessage) */
  readonly complete?: boolean;
  readonly readableFlowing?: boolean | null;
  /** what has been read from the connection and not yet taken, as one piece; null: nothing */
  read(): Uint8Array | null;
  pause(): void;
  resume(): void;
  destroy(err?: Error): void;
  on(event: 'data', f: (chunk: Uint8Array) => void): void;
  on(event: 'error', f: (err: Error) => void): void;
  on(event: 'end' | 'close', f: () => void): void;
}
export interface NodeIncoming extends AsyncIterable<Uint8Array> {
  method?: string;
  url?: string;
  httpVersion?: string;
  rawHeaders: string[];
  socket: { remoteAddress?: string; destroyed: boolean; readableEnded: boolean };
  /** a WebSocket handshake Node's server handed over as an upgrade (see `listenNode`): its connection, and
   * what the app sent after its head */
  upgrade?: { socket: TunnelSocket; head: Uint8Array };
}
export interface NodeOutgoing {
  writeHead(status: number, statusText: string, headers: string[]): void;
  writeHead(status: number, headers: string[]): void;
  statusMessage: string;
  /** false: the connection is full, wait for 'drain'; `written` runs once the chunk has gone to the kernel */
  write(chunk: Uint8Array, written: (err?: Error | null) => void): boolean;
  end(chunk?: Uint8Array): void;
  destroy(): void;
  readonly writableFinished: boolean;
  readonly writableNeedDrain: boolean;
  readonly destroyed: boolean;
  on(event: 'finish' | 'close' | 'drain', f: () => void): void;
  once(event: 'close', f: () => void): void;
}

/** A request as Node's server read it: the target as sent, the raw header list (no `Headers` object is
 * built), and the app's connection, into which an upstream's Node body is passed straight (`pipeNode`). */
export class NodeAppRequest implements AppRequest {
  readonly method: string;
  readonly target: string;
  readonly seen: string;
  readonly urlHost = undefined;
  readonly headers: HeaderList;
  readonly peer: string | undefined;
  readonly version: string | undefined;
  readonly upgrades: 'bytes' | null;
  private readonly incoming: NodeIncoming;
  private readonly outgoing: NodeOutgoing;
  /** what the handler returns once it has written the answer itself, as it always does here (`listenNode`) */
  private readonly written: Response;

  constructor(incoming: NodeIncoming, outgoing: NodeOutgoing, written: Response) {
    this.incoming = incoming;
    this.outgoing = outgoing;
    this.written = written;
    this.method = incoming.method ?? '';
    this.target = this.seen = incoming.url ?? '/';
    this.headers = nodeHeaders(incoming.rawHeaders);
    this.peer = incoming.socket.remoteAddress;
    this.version = incoming.httpVersion;
    this.upgrades = incoming.upgrade ? 'bytes' : null;
  }

  body(): BodySource {
    const it = this.incoming[Symbol.asyncIterator]();
    return { next: () => it.next(), cancel: async (reason) => void (await it.return?.(reason)), giveUp: noop };
  }

  readonly turn = 'behind' as const;

  /** Its connection read to its end (Node's server closes one whose app closed its half) or gone. */
  closed(): boolean {
    const socket = this.incoming.socket;
    return socket.destroyed || socket.readableEnded;
  }

  /** Its connection closing before the response is done (the request's `signal` would cost an
   * AbortController per request). */
  onGone(f: (reason: unknown) => void): () => void {
    const outgoing = this.outgoing;
    outgoing.once('close', () => outgoing.writableFinished || f(appClosed()));
    return noop;
  }

  respond(reply: Reply, done?: BodyDone, idleMs = 0): Response | Promise<Response> {
    if (reply.tunnel) {
      // The upstream's 101, as the app's, and the connection handed to the tunnel.
      const { socket, head } = this.incoming.upgrade!;
      let text = 'HTTP/1.1 101 Switching Protocols\r\n';
      for (const [name, value] of reply.headers) text += `${name}: ${value}\r\n`;
      socket.write(`${text}connection: Upgrade\r\nupgrade: websocket\r\n\r\n`);
      reply.tunnel.bytes(socket, head);
      return this.written;
    }
    // The upstream's body goes straight into the app's connection, no web streams between; an answer of the
    // ambassador's own, or one with no body, in one piece.
    if (reply.node) pipeNode(reply.node, this.outgoing, reply, idleMs, done ?? noop);
    else writeNode(this.outgoing, reply, done);
    return this.written;
  }
}

/** The header that marks the answer a `NodeAppRequest` returns once it has written the real one. */
const WRITTEN_MARK = 'x-ambassador-written';

/** Node's raw header list ([name, value, name, value, ...]) as a `HeaderList`. */
function nodeHeaders(raw: string[]): HeaderList {
  const headers: HeaderList = [];
  for (let i = 0; i < raw.length; i += 2) headers.push([raw[i].toLowerCase(), raw[i + 1]]);
  return headers;
}

/** Node: writes the response head, then passes the upstream body into the app's connection with Node's own
 * backpressure (the upstream's body paused while the app's connection is full), counting bytes. Each chunk's
 * memory is given back once the kernel has it (`release`). An upstream failure mid-body destroys the app's
 * connection (the app sees a broken response, never a short one that looks whole); the app going away
 * destroys the upstream's. */
function pipeNode(body: NodeReadable, outgoing: NodeOutgoing, reply: Reply, idleMs: number, done: BodyDone): void {
  if (outgoing.destroyed) { // the app left while the headers were on their way
    body.destroy();
    return done(0, 'client went away before the response');
  }
  try {
    writeNodeHead(outgoing, reply);
  } catch (err) {
    // Node keeps what it was given even when it refuses it, and would write it again with the answer
    // that replaces this one: nothing written, the body let go, and the handler answers instead.
    outgoing.statusMessage = '';
    body.destroy();
    throw err;
  }
  let bytes = 0;
  const end = callOnce((error?: string) => done(bytes, error));
  outgoing.on('finish', () => end());
  outgoing.on('close', () => {
    if (outgoing.writableFinished) return;
    end('client went away during the response body');
    body.destroy();
  });
  // A body that came whole with its head (a small one, most often) goes out in one piece with the head:
  // nothing is left to wait for, so no timer, and no pipe. Its end frees the upstream connection.
  if (body.complete && !body.readableFlowing) {
    const whole = body.read();
    bytes = whole?.byteLength ?? 0;
    body.resume();
    outgoing.end(whole ?? undefined);
    return;
  }
  // A body that stops arriving is cut off like a broken one. An app that reads slowly is not a stall: while
  // its connection is full (backpressure pauses the upstream's body) the time does not count.
  let idle: ReturnType<typeof setTimeout> | undefined;
  const stalled = () => {
    if (outgoing.writableNeedDrain) idle!.refresh();
    else body.destroy(new TimeoutError(`no body bytes for ${idleMs} ms`));
  };
  if (idleMs > 0) idle = setTimeout(stalled, idleMs);
  body.on('data', (chunk) => {
    bytes += chunk.byteLength;
    idle?.refresh();
    if (!outgoing.write(chunk, (err) => err || release(chunk))) body.pause();
  });
  outgoing.on('drain', () => body.resume());
  body.on('end', () => outgoing.end());
  body.on('close', () => clearTimeout(idle));
  body.on('error', (err) => {
    end(`upstream body failed: ${describeFailure(err)}`);
    outgoing.destroy();
  });
}

/** Node: the head of `reply`, its header list as it is (order and repeats kept), and a Content-Length when
 * `length` is given. */
function writeNodeHead(outgoing: NodeOutgoing, reply: Reply, length?: number): void {
  const flat: string[] = [];
  for (let i = 0; i < reply.headers.length; i++) flat.push(reply.headers[i][0], reply.headers[i][1]);
  if (length !== undefined) flat.push('content-length', String(length));
  if (reply.statusText === '') outgoing.writeHead(reply.status, flat);
  else outgoing.writeHead(reply.status, reply.statusText, flat);
}

/** Node: an answer with no body to pass on — one of the ambassador's own, whole, with its Content-Length, or
 * one whose method or status has none — in one piece. Node's client gives every upstream body as a Node
 * stream (`nodeSend`), so no web stream is ever answered here. */
function writeNode(outgoing: NodeOutgoing, reply: Reply, done?: BodyDone): void {
  if (reply.body) throw new Error('a web stream as a response body on Node');
  const whole = reply.whole ?? null;
  writeNodeHead(outgoing, reply, whole === null ? undefined : whole.byteLength);
  outgoing.end(whole ?? undefined);
  done?.(whole?.byteLength ?? 0);
}

type NodeHttp = Pick<typeof import('node:http'), 'request' | 'Agent'>;
type NodeAgent = InstanceType<NodeHttp['Agent']>;

/** The methods Node's client sends without a body when it is given none; with any other, it writes an empty
 * chunked one unless told a length. */
const NO_DEFAULT_BODY = new Set(['GET', 'HEAD', 'DELETE', 'OPTIONS', 'TRACE', 'CONNECT']);

/** Node's upstream client: `node:http` with a keep-alive pool. It sends the headers exactly as listed
 * (order, repeats, an app's Content-Length on a streamed upload) and adds none of its own. Node 20's fetch
 * holds on to every chunk of a streamed request body (a 1 GiB upload took 1.1 GiB of memory), is several
 * times slower than a pooled http.request, and takes no per-connection TLS settings without the undici
 * package; this gives the handler the same `Reply` fetch would, byte for byte. `pooled: false` (Deno's
 * streamed uploads, see `fetchSend`) opens a connection per request. */
export function nodeSend(
  http: NodeHttp,
  https: NodeHttp,
  { pooled = true, checkServerIdentity }: { pooled?: boolean; checkServerIdentity?: CheckServerIdentity } = {},
): Send {
  // `timeout` closes pooled sockets idle for 4 s, before a Node upstream's own 5 s keep-alive timeout
  // closes them under a request that is reusing them.
  const pool = {
    ...(pooled
      ? { keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256, scheduling: 'lifo' as const, timeout: 4000 }
      : { keepAlive: false }),
    ...(checkServerIdentity ? { checkServerIdentity } : {}),
  };
  const plain = new http.Agent(pool);
  const systemRoots = new https.Agent(pool);
  // One pool per TLS material: after a rotation new connections use the new files, open ones finish.
  const secure = new WeakMap<TlsMaterial, NodeAgent>();
  const agentFor = (tls: TlsMaterial | null): NodeAgent => {
    if (!tls) return systemRoots;
    let agent = secure.get(tls);
    if (!agent) {
      // Verification stays on (rejectUnauthorized is Node's default); `ca` replaces the system roots.
      agent = new https.Agent(
        { ...pool, ca: tls.ca, cert: tls.cert, key: tls.key, minVersion: tls.minVersion } as object,
      );
      secure.set(tls, agent);
    }
    return agent;
  };
  return (to, pathAndQuery, init) =>
    new Promise<Reply>((resolve, reject) => {
      // A flat list keeps the app's header order and repeats; Node then adds no Host of its own.
      const whole = init.body instanceof Uint8Array;
      const streamed = init.body !== null && !whole;
      const headers = ['host', to.authority];
      for (let i = 0; i < init.headers.length; i++) {
        const name = init.headers[i][0];
        if (!whole || name !== 'content-length') headers.push(name, init.headers[i][1]);
      }
      if (whole) headers.push('content-length', String((init.body as Uint8Array).byteLength));
      // No body: Node's client, given its head as a list, would send a POST, PUT, PATCH or unknown method one
      // anyway, chunked and empty, which an upstream that wants a length refuses (411).
      else if (init.body === null && !NO_DEFAULT_BODY.has(init.method)) headers.push('content-length', '0');
      // A streamed body waits for the upstream's 100 Continue (RFC 9110 §10.1.1), as curl's large uploads do:
      // an upstream that turns it down on its head alone (413, 401) is heard before a byte of it is sent. One
      // that ignores Expect gets the body after CONTINUE_WAIT_MS.
      if (streamed) headers.push('expect', '100-continue');
      let req: ReturnType<NodeHttp['request']>;
      try {
        req = (to.https ? https : http).request({
          method: init.method,
          headers,
          agent: to.https ? agentFor(init.tls) : plain,
          host: to.address ?? to.hostname,
          port: to.port,
          path: upstreamTarget(to, pathAndQuery),
          // The certificate must name the upstream (or UPSTREAM_SERVER_NAME), wherever discovery connected.
          ...(to.https ? { servername: init.tls?.serverName ?? to.serverName } : {}),
        });
      } catch (err) { // a method or header the client will not write: nothing was sent
        return reject(unsendable(err));
      }
      // The attempt's end, before the response or during its body, closes the upstream's connection; a
      // tunnel's connection is the tunnel's to close.
      let switched = false;
      init.cancel.on((reason) => switched || req.destroy(reason instanceof Error ? reason : new Error(String(reason))));
      req.on('error', reject);
      // A 101 comes here, not as a response. To a WebSocket handshake (the only request sent with an Upgrade)
      // it hands over the connection, held still until its tunnel reads it; to anything else it is a
      // connection no longer HTTP, and closed.
      req.on('upgrade', (res, socket: TunnelSocket, head: Uint8Array) => {
        const headers = nodeHeaders(res.rawHeaders);
        const problem = headerValue(init.headers, 'upgrade') === null ? unaskedUpgrade() : responseHeadProblem(headers);
        if (problem) {
          socket.destroy();
          return reject(problem);
        }
        switched = true;
        socket.pause();
        resolve({ status: 101, statusText: res.statusMessage ?? '', headers, body: null, upgraded: { socket, head } });
      });
      req.on('response', (res) => {
        // Node's parser takes a status line of any HTTP version (`HTTP/2.0 200`), where Deno's and Bun's clients
        // refuse a major version other than 1: an upstream that says 2 or 3 on an HTTP/1 connection is not
        // speaking HTTP/1 (a later minor version is read as 1.1, RFC 9112 §2.3, as Bun's client reads it).
        if (res.httpVersionMajor !== 1) {
          res.destroy();
          return reject(badVersion(res.httpVersion));
        }
        const status = res.statusCode ?? 502;
        const headers: HeaderList = [];
        for (let i = 0; i < res.rawHeaders.length; i += 2) {
          headers.push([res.rawHeaders[i].toLowerCase(), res.rawHeaders[i + 1]]);
        }
        const problem = responseHeadProblem(headers);
        if (problem) {
          res.destroy();
          return reject(problem);
        }
        const noBody = init.method === 'HEAD' || NULL_BODY_STATUS.has(status);
        if (noBody) {
          res.resume();
        }
        resolve({
          status,
          statusText: res.statusMessage ?? '',
          headers,
          body: null,
          node: noBody ? undefined : res as unknown as NodeReadable,
        });
      });
      const body = init.body;
      if (body === null) req.end();
      else if (body instanceof Uint8Array) req.end(body);
      else {
        // An upstream may also turn the body down while it is on its way (RFC 9112 §9.6: the client stops
        // sending). Between chunks the event loop reads what has come in, so that answer is seen and the
        // upload stops, rather than a write into the closing connection failing first and the answer being
        // lost with it. An answer that is not a refusal (a response streamed back while the body still
        // goes) lets the upload go on.
        let stop = false;
        let started = false;
        let sentWhole = false;
        const upload = async () => {
          if (started) return;
          started = true;
          clearTimeout(unasked);
          const reader = body.getReader();
          try {
            for (let next = await reader.read(); !next.done && !stop; next = await reader.read()) {
              if (!req.write(next.value)) await new Promise((r) => req.once('drain', r));
              await new Promise((r) => setImmediate(r));
            }
            if (stop) void reader.cancel().catch(() => {});
            else (sentWhole = true), req.end();
          } catch (err) {
            req.destroy(err as Error);
          }
        };
        const unasked = setTimeout(upload, CONTINUE_WAIT_MS);
        req.once('continue', upload);
        req.once('response', (res) => {
          clearTimeout(unasked);
          if (started && (res.statusCode ?? 0) < 400) return;
          // Answered before the body was asked for, or turned down on its way: the rest is not sent, and the
          // connection, left with a request it cannot finish, is closed once the answer has been read.
          stop = true;
          if (!started) void body.cancel().catch(() => {});
          started = true;
          res.once('end', () => sentWhole || req.destroy());
        });
        req.once('close', () => clearTimeout(unasked));
      }
    });
}

/** How long a streamed upload waits for the upstream's 100 Continue before it is sent anyway (curl's wait). */
const CONTINUE_WAIT_MS = 1000;

/** How a TLS client checks the name in an upstream's certificate (node:tls's signature). */
type CheckServerIdentity = (hostname: string, cert: { subjectaltname?: string }) => Error | undefined;

/** The name check of Node's TLS (also Bun's), without its fallback to the Common Name of a certificate
 * that has no subjectAltName: RFC 6125 §6.4.4 and every browser require the SAN. Deno's client already does. */
function subjectAltNameOnly(
  tls: { checkServerIdentity(hostname: string, cert: never): Error | undefined },
): CheckServerIdentity {
  return (hostname, cert) =>
    cert.subjectaltname ? tls.checkServerIdentity(hostname, cert as never) : Object.assign(
      new Error(`the certificate for ${hostname} has no subjectAltName, and its Common Name is not checked`),
      { code: 'ERR_TLS_CERT_ALTNAME_INVALID' },
    );
}

const DNS_LOOKUP_TIMEOUT_MS = 1000;

/** Node's resolver: A and AAAA records with their TTL; a name only the hosts file knows (localhost, a
 * pod's hostAliases) through getaddrinfo, which tells no TTL. A new resolver for each lookup (it reads the
 * system's servers as it starts): Bun's keeps an answer for its whole TTL, and podman's DNS gives a container's
 * address a TTL of a day, so Bun went on sending to a restarted inventory's old address. Each lookup gets
 * DNS_LOOKUP_TIMEOUT_MS, twice (the second wait twice as long): a server that does not answer costs a refresh
 * about 3 s, and the endpoints known stay in use meanwhile. */
export function nodeResolve(dns: Pick<typeof import('node:dns'), 'promises'>): Resolve {
  return async (hostname) => {
    const resolver = new dns.promises.Resolver({ timeout: DNS_LOOKUP_TIMEOUT_MS, tries: 2 });
    const answers = await Promise.allSettled([
      resolver.resolve4(hostname, { ttl: true }),
      resolver.resolve6(hostname, { ttl: true }),
    ]);
    const records = answers.flatMap((a) => (a.status === 'fulfilled' ? a.value : []));
    if (records.length > 0) {
      return {
        addresses: records.map((r) => r.address),
        ttlMs: Math.min(...records.map((r) => r.ttl)) * 1000,
      };
    }
    return { addresses: (await dns.promises.lookup(hostname, { all: true })).map((a) => a.address) };
  };
}

/** Requests pipelined on one connection that may wait their turn (`listenNode`). Node's parser reads every
 * request the socket holds at once, and each holds some KiB until it is answered: 20,000 in one write (600 KB)
 * took the process past 300 MiB. Past this many the connection is closed, and the app sends again what was not
 * answered, as after any close (RFC 9112 §9.3.2); no client that pipelines goes near it. */
const PIPELINE_MAX_WAITING = 256;

/** Node's server: node:http, each request handed to the proxy app as a `NodeAppRequest`, which writes every
 * answer itself into the request's `ServerResponse`. Hono routes it by a `Request` of two fields, its method
 * and a URL of its target (the app never reads more of it): a `Request` of Node's own, or a server adapter's,
 * costs more than the handler's whole routing. */
async function listenNode(handler: ProxyHandler, host: string, port: number, work: Work): Promise<Listener> {
  const { createServer, ServerResponse } = await import('node:http');
  // What the handler returns once it has written the answer. Hono answers a HEAD with a copy of the GET's
  // response, so its mark is in a header too.
  const written = new Response(null, { headers: { [WRITTEN_MARK]: '1' } });
  // Each connection's requests in progress (the one being answered, and those pipelined behind it, waiting),
  // and since when it has had none: the drain closes a connection only once it has been idle DRAIN_IDLE_MS.
  type Tracked = { destroy(): void; once(event: 'close', f: () => void): void };
  const sockets = new Map<Tracked, { busy: number; idleSince: number; waiting: Array<() => void> }>();
  type Incoming = Parameters<Parameters<typeof createServer>[1] & {}>[0];
  type Outgoing = Parameters<Parameters<typeof createServer>[1] & {}>[1];
  // A connection's requests are taken one at a time, as nginx and Deno's server take them: Node's parser hands
  // on a request pipelined behind one still being answered, and forwarded side by side the second could reach
  // the upstream first (a GET overtaking the POST whose effect it reads). It waits for the answer before it;
  // if the app has gone meanwhile, it is never forwarded.
  const server = createServer({
    shouldUpgradeCallback: (req) => isWebSocketUpgrade(req.method ?? '', nodeHeaders(req.rawHeaders)),
  }, (incoming, outgoing) => {
    const state = sockets.get(incoming.socket as unknown as Tracked);
    if (!state) return serve(incoming, outgoing);
    state.busy++;
    outgoing.once('close', () => {
      state.busy--;
      state.idleSince = performance.now();
      state.waiting.shift()?.();
    });
    if (state.busy === 1) return serve(incoming, outgoing);
    const waiting = state.waiting.push(() => {
      if (incoming.socket?.destroyed) outgoing.destroy();
      else serve(incoming, outgoing);
    });
    if (waiting > PIPELINE_MAX_WAITING) {
      state.waiting.length = 0;
      incoming.socket?.destroy();
      work.warn(
        `an app pipelined more than ${PIPELINE_MAX_WAITING} requests on one connection: closed, the rest unanswered`,
      );
    }
  });
  const serve = (incoming: Incoming, outgoing: Outgoing) => {
    const target = incoming.url ?? '/';
    const routed = { method: incoming.method, url: `http://ambassador${target[0] === '/' ? target : '/'}` };
    let answer: Response | Promise<Response>;
    try {
      answer = handler(routed as Request, new NodeAppRequest(incoming as never, outgoing as never, written));
    } catch (err) {
      answer = Promise.reject(err);
    }
    if (answer instanceof Promise) answer.then((a) => unwritten(a, outgoing), (err) => failed(err, outgoing));
    else unwritten(answer, outgoing);
  };
  // An answer the handler did not write, or a failure it did not answer: neither should come (the proxy app's
  // `onError` answers whatever its handler throws), and the app still gets an answer or a cut connection.
  const unwritten = (answer: Response, outgoing: InstanceType<typeof ServerResponse>) => {
    if (answer !== written && answer.headers.get(WRITTEN_MARK) === null) {
      failed(new Error(`an answer not written (${answer.status})`), outgoing);
    }
  };
  const failed = (err: unknown, outgoing: InstanceType<typeof ServerResponse>) => {
    work.failed(describeFailure(err));
    if (outgoing.headersSent) return void outgoing.destroy();
    outgoing.writeHead(500, { 'content-type': 'text/plain; charset=utf-8', connection: 'close' });
    outgoing.end('ambassador: internal error\n');
  };
  // Longer than the idle timeouts of common clients (Go keeps idle connections 90 s, Node's agents
  // less), so the app is not the one reusing a connection the ambassador is closing.
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  server.requestTimeout = 0; // a large upload may take longer than Node's default 5 minutes
  // A WebSocket handshake comes as an upgrade, with the app's connection; it goes to the handler like any
  // request, with a response of its own on that connection for an answer other than a 101 (the last one
  // on it: Node reads no more requests there). Only WebSocket handshakes come here (shouldUpgradeCallback,
  // Node 24.9): before it, every Upgrade would, h2c too, so there none is taken and a handshake is a
  // plain request.
  if (typeof (server as { shouldUpgradeCallback?: unknown }).shouldUpgradeCallback === 'function') {
    server.on('upgrade', (req: NodeIncoming, socket: TunnelSocket, head: Uint8Array) => {
      socket.pause();
      const res = new ServerResponse(req as never);
      res.assignSocket(socket as never);
      res.on('finish', () => socket.end());
      req.upgrade = { socket, head };
      server.emit('request', req, res);
    });
  }
  // Node does not route CONNECT to the request handler; answer it rather than drop the socket.
  server.on('connect', (_req: unknown, socket: { end(data: string): void }) => {
    socket.end('HTTP/1.1 405 Method Not Allowed\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
  });
  server.on('connection', (socket: Tracked) => {
    sockets.set(socket, { busy: 0, idleSince: performance.now(), waiting: [] });
    socket.once('close', () => sockets.delete(socket));
  });
  const { Server: NetServer } = await import('node:net');
  return {
    port: await listenOnPort(server, host, port),
    settleMs: 0,
    close: () =>
      new Promise<void>((resolve) => {
        // A connection turns idle only after its last response, so idle ones are looked for again and again;
        // a half-sent request head counts as idle too, so it cannot hold the drain.
        const sweep = setInterval(() => {
          const now = performance.now();
          for (const [socket, state] of sockets) {
            if (state.busy === 0 && now - state.idleSince >= DRAIN_IDLE_MS) socket.destroy();
          }
        }, 50);
        // net.Server's close stops accepting; http.Server's (Node ≥ 19) would also close every idle connection
        // at once, and reset a request already on its way on one.
        NetServer.prototype.close.call(server, () => {
          clearInterval(sweep);
          resolve();
        });
      }),
    cutOff: () => server.closeAllConnections(),
    connections: () => sockets.size,
  };
}

/** Has a node:net or node:http server listen on host:port, and says which port it got (port 0: any). */
function listenOnPort(
  server: Pick<import('node:net').Server, 'once' | 'off' | 'listen' | 'address'>,
  host: string,
  port: number,
): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      const address = server.address();
      resolve(typeof address === 'object' && address ? address.port : port);
    });
  });
}

async function nodeReadFile(): Promise<ReadFile> {
  const fs = await import('node:fs');
  return (path) => fs.readFileSync(path, 'utf8');
}

/** Node: a secure context finds a key that is not its certificate's; each CA certificate is parsed on its
 * own, since a secure context passes over a CA block it cannot read. */
function nodeCheckTls(
  tls: Pick<typeof import('node:tls'), 'createSecureContext'>,
  crypto: Pick<typeof import('node:crypto'), 'X509Certificate'>,
): CheckTls {
  return (m) => {
    if (m.ca !== undefined) {
      const blocks = m.ca.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
      if (blocks.length === 0) throw new Error('no CERTIFICATE block in the CA file');
      for (const block of blocks) new crypto.X509Certificate(block);
    }
    tls.createSecureContext({ ca: m.ca, cert: m.cert, key: m.key, minVersion: m.minVersion });
  };
}

/** Node's and Bun's write to stdout. A reader that goes away (a log collector restarting, `| head`) makes the
 * next write fail with EPIPE, which `process.stdout` emits as an error (Node) or throws (Bun) that would end the
 * process: it is caught here, and every write after it reports its lines as not delivered. */
function nodeWriteOut(): Runtime['writeOut'] {
  let gone = false;
  process.stdout.on('error', () => (gone = true));
  return (text, written) => {
    if (gone) return written(true);
    try {
      process.stdout.write(`${text}\n`, (err) => written(!!err));
    } catch { // Bun throws it from the write itself
      gone = true;
      written(true);
    }
  };
}

/** What Node and Bun share: Node's file, TLS, DNS and process APIs (Bun has them too). */
async function nodeBuiltins(): Promise<
  Pick<
    Runtime,
    'readFile' | 'checkTls' | 'resolve' | 'usage' | 'env' | 'writeOut' | 'memory' | 'cpu' | 'onSignal' | 'exit'
  >
> {
  const readFile = await nodeReadFile();
  return {
    readFile,
    checkTls: nodeCheckTls(await import('node:tls'), await import('node:crypto')),
    resolve: nodeResolve(await import('node:dns')),
    usage: processUsage,
    env: () => process.env,
    // A plain write to stdout, without console.log's formatting of what it is given.
    writeOut: nodeWriteOut(),
    memory: () => cgroupMemory(readFile),
    cpu: () => cgroupCpu(readFile),
    onSignal: (signal, f) => void process.on(signal, f),
    exit: (code) => process.exit(code),
  };
}

export async function nodeRuntime(): Promise<Runtime> {
  const send = nodeSend(await import('node:http'), await import('node:https') as unknown as NodeHttp, {
    checkServerIdentity: subjectAltNameOnly(await import('node:tls')),
  });
  return {
    ...await nodeBuiltins(),
    name: 'node',
    tlsByAddress: true,
    tlsLimits: null,
    send,
    upgrade: send, // its agents let go of a connection a 101 took over
    listen: (handler, host, port, work) => listenNode(handler, host, port, work),
  };
}

// --- What Deno and Bun share: a server that hands over a `Request`, and `fetch` to the upstream ----------

/** A request as Deno's and Bun's servers hand it over: a `Request` whose URL they made of the target and
 * the Host header. `direct`: Bun, whose "direct" streams pass a body on without a stream queue, and whose
 * request signal is looked at only once the request has lasted a while (`watchGoneLater`). `peer`: the
 * app's address (Deno), or how to ask for it (Bun, where each question is a system call and the answer is
 * null once the connection is closed): asked once, by `closed` or when the address is first wanted. */
export class FetchAppRequest implements AppRequest {
  readonly method: string;
  readonly target: string;
  readonly seen: string;
  readonly urlHost: string;
  readonly headers: HeaderList;
  readonly upgrades = 'messages' as const;
  private readonly request: Request;
  private address: string | undefined;
  private askPeer: (() => { address: string } | null) | null;
  private readonly direct: boolean;
  private readonly upgrade: Upgrader;
  readonly closed: () => boolean;
  readonly turn = 'always' as const;

  constructor(
    request: Request,
    peer: string | undefined | (() => { address: string } | null),
    direct: boolean,
    upgrade: Upgrader,
  ) {
    this.request = request;
    this.direct = direct;
    this.upgrade = upgrade;
    if (typeof peer === 'function') {
      this.askPeer = peer;
      this.closed = () => {
        const at = peer();
        this.askPeer = null;
        this.address = at?.address;
        return at === null;
      };
    } else {
      this.askPeer = null;
      this.address = peer;
      this.closed = () => request.signal.aborted;
    }
    const url = parseUrl(request.url);
    this.method = request.method;
    this.target = url.pathname + url.search;
    this.seen = request.url;
    this.urlHost = url.host;
    this.headers = headerList(request.headers);
  }

  get peer(): string | undefined {
    if (this.askPeer) this.closed();
    return this.address;
  }

  body(): BodySource | null {
    const reader = this.request.body?.getReader();
    if (!reader) return null;
    const cancel = (reason: unknown) => reader.cancel(reason).catch(noop);
    const read = () => reader.read().catch(malformedBody);
    return { next: read, cancel, giveUp: cancel };
  }

  /** The request's signal, whose listener is removed when the response is done: Deno aborts
   * request.signal after a successful response too (unless run with --unstable-no-legacy-abort, as
   * deno.json asks), and that must not reach a finished exchange. */
  onGone(f: (reason: unknown) => void): () => void {
    return this.direct ? watchGoneLater(this.request, f) : watchGone(this.request, f);
  }

  respond(reply: Reply, done?: BodyDone, idleMs = 0): Response | Promise<Response> {
    if (reply.tunnel) {
      return this.upgrade(this.request, reply.tunnel, headerValue(reply.headers, 'sec-websocket-protocol'));
    }
    return webResponse(reply, done, idleMs, this.direct, () => this.request.signal.aborted);
  }
}

/** A request body that breaks its own framing (a chunk size that is not hex, a chunk without its CRLF) is the
 * app's request at fault, a 400, not the app gone. Node's and Bun's servers answer it themselves and close;
 * Deno's hands it to the handler as a read that fails with this message, and leaves the connection open for
 * the answer. */
function malformedBody(err: unknown): never {
  if (/invalid HTTP\/1 request/.test(String((err as Error | undefined)?.message))) {
    throw new ClientError(400, `a malformed request body (${(err as Error).message})`);
  }
  throw err;
}

/** `f` once the request's signal aborts: the app went away. A signal looked at after it aborted says so. */
function watchGone(request: Request, f: (reason: unknown) => void): () => void {
  const signal = request.signal;
  if (signal.aborted) {
    f(signal.reason);
    return noop;
  }
  const onAbort = () => f(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  return () => signal.removeEventListener('abort', onAbort);
}

/** Bun makes a request's signal only when it is first asked for, and that costs about 5 µs of CPU, a tenth of
 * what the ambassador spends on a small request (measured A/B, 64 connections). So the signal of a request
 * is looked at only if it is still in flight at the second sweep after it came, GONE_SWEEP_MS apart:
 * most requests are answered before then and never pay for it. A request whose app went away before that
 * finds its signal already aborted (Bun keeps that), so it is told then: the app's going away reaches the
 * upstream at most two sweeps late, never not at all. */
function watchGoneLater(request: Request, f: (reason: unknown) => void): () => void {
  const entry: GoneEntry = { request, f, off: null };
  goneYoung.add(entry);
  goneTimer ??= setTimeout(sweepGone, GONE_SWEEP_MS);
  return () => {
    if (!goneYoung.delete(entry) && !goneOld.delete(entry)) entry.off?.();
  };
}

const GONE_SWEEP_MS = 10;
type GoneEntry = { request: Request; f: (reason: unknown) => void; off: (() => void) | null };
let goneYoung = new Set<GoneEntry>(); // came since the last sweep
let goneOld = new Set<GoneEntry>(); // came before it, still in flight: watched at the next
let goneTimer: ReturnType<typeof setTimeout> | undefined;

function sweepGone(): void {
  goneTimer = undefined;
  const old = goneOld;
  goneOld = goneYoung;
  goneYoung = new Set();
  for (const entry of old) entry.off = watchGone(entry.request, entry.f);
  if (goneOld.size > 0) goneTimer = setTimeout(sweepGone, GONE_SWEEP_MS);
}

/** Deno's and Bun's WebSocket upgrade: the app's handshake answered by the server's own WebSocket, which is the
 * app's end of `tunnel`; `protocol`: the one the upstream chose. */
type Upgrader = (request: Request, tunnel: Tunnel, protocol: string | null) => Response;

/** An app's WebSocket that closed before it opened: nothing is sent to it. */
const CLOSED_SOCKET: MessageSocket = { send: noop, close: noop, buffered: () => 0 };

/** The request's URL. Deno makes it from the Host header, so a Host that is no host (`a b`, `one, two`)
 * gives a URL that does not parse: it stands as one that `earlyAnswer` turns away (400). */
function parseUrl(url: string): URL {
  try {
    return new URL(url);
  } catch {
    return new URL('http://invalid.host./');
  }
}

/** Where a fetch client sends an attempt: the URL, and the headers. An address discovery found goes in the
 * URL, the upstream's name in Host (and, for https://, in the name the certificate is verified against). */
function fetchTarget(to: Destination, pathAndQuery: string, headers: HeaderList): { url: string; headers: HeaderList } {
  if (to.address === null) return { url: to.baseUrl + pathAndQuery, headers };
  const url = `${to.https ? 'https' : 'http'}://${bracketed(to.address)}:${to.port}${upstreamTarget(to, pathAndQuery)}`;
  return { url, headers: [['host', to.authority], ...headers] };
}

/** What a fetch is given for an attempt: its method, headers and body; the attempt's cancellation as its
 * signal; redirects left to the app (they are its business, not ours); `duplex: 'half'`, so a streamed body
 * can be sent; and `extra`, the runtime's own options. */
function fetchInit(init: Parameters<Send>[2], headers: HeaderList, extra: object): RequestInit {
  return {
    method: init.method,
    headers,
    body: init.body,
    signal: signalOf(init.cancel),
    redirect: 'manual',
    duplex: 'half',
    ...extra,
  } as RequestInit;
}

/** The attempt's cancellation as the AbortSignal a fetch takes. */
function signalOf(cancel: Cancel): AbortSignal {
  const abort = new AbortController();
  cancel.on((reason) => abort.abort(reason));
  return abort.signal;
}

/** A Headers' fields as a list, in the order and combination its iteration gives (each Set-Cookie apart). By
 * `forEach`, not by spreading it: Deno's iterator took 4.6 µs for six fields where its `forEach` takes 0.6,
 * twice a request (Bun: 0.44 either way). */
function headerList(headers: Headers): HeaderList {
  const list: HeaderList = [];
  headers.forEach((value, name) => list.push([name, value]));
  return list;
}

/** A fetch response as a `Reply` (Deno's and Bun's clients), held to the same head rules as Node's. On Bun
 * (`cancel`: the attempt's), a short body that came whole with its head is taken whole (`arrivedWhole`). */
async function replyOf(res: Response, cancel?: Cancel): Promise<Reply> {
  const headers = headerList(res.headers);
  const problem = responseHeadProblem(headers);
  if (problem) {
    await res.body?.cancel();
    throw problem;
  }
  const reply: Reply = { status: res.status, statusText: res.statusText, headers, body: null };
  if (peek && cancel && declaredLength(reply) <= WHOLE_BODY_MAX) return arrivedWhole(res, reply, cancel);
  reply.body = res.body;
  return reply;
}

/** Bun: a short body (by its Content-Length) has mostly come with its head, and is then taken whole as it
 * is, without a web stream, a reader or a read: those were 4 % of Bun's CPU a small request on a core of its
 * own, and 11 % inside the pod's limits (measured A/B). Whether it has all come cannot be asked without
 * taking it, so a copy of the response is taken (`clone`, which shares a body that has come and splits one
 * still coming), and `peek` says whether that settled at once. If not, the body is read from the original
 * as any short body is (`wholeResponse`: the idle rule for each silence, the bytes before a break), and the
 * copy reads on beside it; cancelling the original then cancels the fetch, or the copy would hold the
 * upstream's connection open. */
function arrivedWhole(res: Response, reply: Reply, cancel: Cancel): Reply {
  const copy = res.clone().bytes();
  if (peek!.status(copy) === 'fulfilled') {
    reply.whole = peek!(copy) as Uint8Array<ArrayBuffer>;
    return reply;
  }
  copy.catch(noop); // its failure is the original's too, told there
  const reader = res.body!.getReader();
  reply.body = new ReadableStream<Uint8Array>({
    pull: async (c) => {
      const read = await reader.read();
      if (read.done) c.close();
      else c.enqueue(read.value);
    },
    cancel: (reason) => {
      cancel.abort(reason);
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
  return reply;
}

// --- Deno: Deno.serve, fetch to the upstream (node:http for an upload with a length), Deno's resolver --

/** Deno's API as used here, typed locally: the file needs no Deno types. */
interface DenoLike {
  serve(options: {
    hostname: string;
    port: number;
    signal: AbortSignal;
    onListen?: (addr: unknown) => void;
    handler: (req: Request, info: { remoteAddr: { hostname: string } }) => Response | Promise<Response>;
    onError?: (err: unknown) => Response;
  }): { addr: { port: number }; shutdown(): Promise<void>; finished: Promise<void> };
  addSignalListener(signal: string, handler: () => void): void;
  env: { toObject(): Record<string, string> };
  exit(code: number): never;
  mainModule: string;
  createHttpClient(
    options: { caCerts?: string[]; cert?: string; key?: string; allowHost?: boolean; poolMaxIdlePerHost?: number },
  ): DenoHttpClient;
  readTextFileSync(path: string): string;
  stdout: { write(p: Uint8Array): Promise<number>; writeSync(p: Uint8Array): number };
  resolveDns(query: string, type: 'A' | 'AAAA'): Promise<string[]>;
  upgradeWebSocket(req: Request, options: { protocol?: string; idleTimeout?: number }): {
    socket: WebSocket;
    response: Response;
  };
}

interface DenoHttpClient {
  close(): void;
}

/** Deno's `console.log` waits while whatever reads stdout falls behind, which would stop the proxy: the log's
 * text goes out through `Deno.stdout.write`, which does not wait, a piece at a time until all is taken. */
function denoWriteOut(d: DenoLike): Runtime['writeOut'] {
  const encoder = new TextEncoder();
  return (text, written) => {
    const bytes = encoder.encode(`${text}\n`);
    const rest = (from: number): void =>
      void d.stdout.write(bytes.subarray(from)).then(
        (n) => (from + n < bytes.length ? rest(from + n) : written()),
        () => written(true), // stdout closed: nothing more will go out of it
      );
    rest(0);
  };
}

function denoRuntime(d: DenoLike): Runtime {
  // Deno imports node:http only when a streamed upload with a length (see `fetchSend`) or a WebSocket
  // handshake first needs it.
  const withLength = lazySend(async () =>
    nodeSend(await import('node:http'), await import('node:https') as unknown as NodeHttp, { pooled: false })
  );
  return {
    name: 'deno',
    send: fetchSend(d, withLength),
    upgrade: withLength,
    resolve: denoResolve(d),
    readFile: (path) => d.readTextFileSync(path),
    checkTls: denoCheckTls(d),
    tlsByAddress: false,
    tlsLimits: { runtime: 'Deno', client: 'client', serverName: false },
    // Deno has Node's `process` as a global too.
    usage: processUsage,
    env: () => d.env.toObject(),
    writeOut: denoWriteOut(d),
    writeOutAtExit: (text) => {
      const bytes = new TextEncoder().encode(`${text}\n`);
      for (let from = 0; from < bytes.length;) from += d.stdout.writeSync(bytes.subarray(from));
    },
    memory: () => cgroupMemory((path) => d.readTextFileSync(path)),
    cpu: () => cgroupCpu((path) => d.readTextFileSync(path)),
    listen: (handler, host, port, work) => Promise.resolve(listenDeno(d, handler, host, port, work)),
    onSignal: (signal, f) => d.addSignalListener(signal, f),
    exit: (code) => d.exit(code),
  };
}

/** Deno's server cuts off request bodies still arriving when it shuts down, so `close` first waits for
 * `uploadsRead` (the drain's deadline still bounds it). It cannot stop accepting without closing idle
 * connections at once: the drain lets it go on accepting for DRAIN_IDLE_MS first (`settleMs`). */
function listenDeno(d: DenoLike, handler: ProxyHandler, host: string, port: number, work: Work): Listener {
  const abort = new AbortController();
  const upgrade: Upgrader = (request, tunnel, protocol) => {
    // Deno's own pings are off (idleTimeout 0): BODY_IDLE_TIMEOUT_MS is the tunnel's idle rule. The chosen
    // protocol is set on the 101 itself: Deno's check of it splits the app's list only at ", ", and
    // `chat,superchat` (as the ws package writes it) would refuse `chat`.
    let upgraded: ReturnType<DenoLike['upgradeWebSocket']>;
    try {
      upgraded = d.upgradeWebSocket(request, { idleTimeout: 0 });
    } catch (err) {
      tunnel.messages(CLOSED_SOCKET).closed(1006, '');
      return new Response(`ambassador: the WebSocket handshake could not be completed: ${describeFailure(err)}\n`, {
        status: 400,
      });
    }
    const { socket, response } = upgraded;
    if (protocol) response.headers.set('sec-websocket-protocol', protocol);
    socket.binaryType = 'arraybuffer';
    let relay: MessageRelay | undefined;
    socket.onopen = () =>
      relay = tunnel.messages({
        send: (data) => socket.send(data as string | Uint8Array<ArrayBuffer>),
        // A code Deno's WebSocket will not send goes as 1000.
        close: (code, reason) => {
          try {
            socket.close(code, reason);
          } catch {
            socket.close(1000, reason);
          }
        },
        buffered: () => socket.bufferedAmount,
      });
    socket.onmessage = (e) =>
      relay?.message(typeof e.data === 'string' ? e.data : new Uint8Array(e.data as ArrayBuffer));
    socket.onclose = (e) => (relay ??= tunnel.messages(CLOSED_SOCKET)).closed(e.code, e.reason);
    return response;
  };
  const server = d.serve({
    hostname: host,
    port,
    signal: abort.signal,
    onListen: () => {},
    handler: (req, info) => {
      const res = handler(req, new FetchAppRequest(req, info.remoteAddr.hostname, false, upgrade));
      return req.method === 'HEAD' ? Promise.resolve(res).then((r) => headAnswer(r, false)) : res;
    },
    // A body cut off on purpose (`CUT_OFF`) is in its request's log line already. Anything else is a failure
    // the proxy app did not answer (its `onError` answers what its handler throws).
    onError: (err) => {
      if (err !== CUT_OFF) work.failed(describeFailure(err));
      return new Response('ambassador: internal error\n', { status: 500, headers: { connection: 'close' } });
    },
  });
  let closing = false;
  return {
    port: server.addr.port,
    settleMs: DRAIN_IDLE_MS,
    close: async () => {
      closing = true;
      await work.uploadsRead();
      await server.shutdown();
    },
    // Aborting a server that is shutting down throws inside Deno; the exit that follows closes its sockets.
    cutOff: () => closing || abort.abort(),
  };
}

/** Deno's upstream client: fetch. An address found by discovery is reached by URL with the upstream's name
 * kept in Host (`allowHost`); an https:// upstream is always reached by name, which its certificate must
 * carry. A streamed body whose Content-Length the app gave goes by `withLength` instead (`nodeSend`, one
 * connection per request): Deno's fetch sends every streamed body chunked, which S3-style upstreams
 * refuse, and Deno's node:http, which keeps the length, resends a request — a POST too — on a reused
 * keep-alive connection that fails under it, so it never gets one to reuse. An upstream on one of the
 * fetch standard's "bad ports" (`FETCH_BAD_PORTS`) goes by `withLength` too: Deno's fetch refuses to
 * connect to one, and every request would fail as if the app's were at fault. */
function fetchSend(d: DenoLike, withLength: Send): Send {
  // Deno's client sends a request again, on a new connection, when a reused one closes under it — even a
  // POST the upstream has already read. A request that must not be repeated therefore never goes on a
  // reused connection: its clients keep none idle (`unpooled`).
  type Clients = { pooled?: DenoHttpClient; unpooled?: DenoHttpClient };
  const pick = (set: Clients, options: Parameters<DenoLike['createHttpClient']>[0], unrepeatable: boolean) =>
    unrepeatable
      ? (set.unpooled ??= d.createHttpClient({ ...options, poolMaxIdlePerHost: 0 }))
      : (set.pooled ??= d.createHttpClient(options));
  const byTls = new WeakMap<TlsMaterial, Clients>();
  const plain: Clients = {};
  const byAddress: Clients = {};
  const clientFor = (tls: TlsMaterial, unrepeatable: boolean) => {
    let set = byTls.get(tls);
    if (!set) byTls.set(tls, set = {});
    return pick(set, {
      caCerts: tls.ca ? [tls.ca] : undefined,
      ...(tls.cert && tls.key ? { cert: tls.cert, key: tls.key } : {}),
    }, unrepeatable);
  };
  return async (to, pathAndQuery, init) => {
    if (
      FETCH_BAD_PORTS.has(to.port) ||
      (init.body instanceof ReadableStream && headerValue(init.headers, 'content-length') !== null)
    ) return withLength(to, pathAndQuery, init);
    const unrepeatable = !IDEMPOTENT.has(init.method) && headerValue(init.headers, 'idempotency-key') === null;
    const { url, headers } = fetchTarget(to, pathAndQuery, init.headers);
    let client: DenoHttpClient | undefined;
    if (init.tls) client = clientFor(init.tls, unrepeatable);
    else if (to.address !== null) client = pick(byAddress, { allowHost: true }, unrepeatable);
    else if (unrepeatable) client = pick(plain, {}, true);
    let res: Response;
    try {
      res = await fetch(url, fetchInit(init, headers, { client }));
    } catch (err) {
      // fetch raises TypeError both for a request it will not make and for a network failure ("fetch
      // failed", with the cause). The first is the app's request at fault, and nothing was sent.
      if (err instanceof TypeError && err.cause === undefined && !/fetch failed/i.test(err.message)) {
        throw unsendable(err);
      }
      throw err;
    }
    return replyOf(res);
  };
}

/** The ports the fetch standard blocks (https://fetch.spec.whatwg.org/#bad-port), which Deno's fetch will
 * not connect to: X11's 6000 and IRC's 6665–6669 among them. */
const FETCH_BAD_PORTS = new Set(
  ('1 7 9 11 13 15 17 19 20 21 22 23 25 37 42 43 53 69 77 79 87 95 101 102 103 104 109 110 111 113 115 117 119 ' +
    '123 135 137 139 143 161 179 389 427 465 512 513 514 515 526 530 531 532 540 548 554 556 563 587 601 636 989 ' +
    '990 993 995 1719 1720 1723 2049 3659 4045 4190 5060 5061 6000 6566 6665 6666 6667 6668 6669 6679 6697 10080')
    .split(' ').map(Number),
);

/** A Send made the first time it is needed. */
function lazySend(make: () => Promise<Send>): Send {
  let made: Promise<Send> | undefined;
  return async (to, pathAndQuery, init) => (await (made ??= make()))(to, pathAndQuery, init);
}

/** Deno's resolver: A and AAAA records (Deno.resolveDns tells no TTL). */
function denoResolve(d: DenoLike): Resolve {
  return async (hostname) => {
    const answers = await Promise.allSettled([d.resolveDns(hostname, 'A'), d.resolveDns(hostname, 'AAAA')]);
    const addresses = answers.flatMap((a) => (a.status === 'fulfilled' ? a.value : []));
    if (addresses.length === 0) throw answers.find((a) => a.status === 'rejected')?.reason ?? new Error('no addresses');
    return { addresses };
  };
}

function denoCheckTls(d: DenoLike): CheckTls {
  return (m) =>
    d.createHttpClient({ caCerts: m.ca ? [m.ca] : undefined, ...(m.cert && m.key ? { cert: m.cert, key: m.key } : {}) })
      .close();
}

// --- Bun: Bun.serve, Bun's fetch to the upstream, Node's resolver, files and TLS (Bun has them) -----------

/** Bun's server and the parts of its API used here, typed locally like `DenoLike`: the file needs no Bun types. */
interface BunLike {
  serve(options: {
    hostname: string;
    port: number;
    idleTimeout: number;
    maxRequestBodySize: number;
    fetch(req: Request, server: BunServer): Response | undefined | Promise<Response | undefined>;
    websocket: {
      open(ws: BunWebSocket): void;
      message(ws: BunWebSocket, message: string | Uint8Array): void;
      close(ws: BunWebSocket, code: number, reason: string): void;
      perMessageDeflate: boolean;
      maxPayloadLength: number;
      idleTimeout: number;
    };
  }): BunServer;
  /** a promise's value without waiting a turn, once `status` says it has settled (`arrivedWhole`) */
  peek: {
    <T>(promise: Promise<T>): T | Promise<T>;
    status(promise: Promise<unknown>): 'pending' | 'fulfilled' | 'rejected';
  };
  /** Bun's foreign function interface (`bun:ffi`, also here), for the one system call `scheduleBatchOnBun` makes */
  FFI?: {
    dlopen(
      library: string,
      symbols: { sched_setscheduler: { args: ['i32', 'i32', 'ptr']; returns: 'i32' } },
    ): { symbols: { sched_setscheduler(tid: number, policy: number, param: Int32Array): number }; close(): void };
  };
}
/** An app's WebSocket on Bun's server; `data`: what the tunnel gave it at the upgrade. */
interface BunWebSocket {
  data: {
    open(ws: BunWebSocket): void;
    message(m: string | Uint8Array): void;
    close(code: number, reason: string): void;
  };
  send(data: string | Uint8Array): number;
  close(code?: number, reason?: string): void;
  getBufferedAmount(): number;
}
interface BunServer {
  upgrade(req: Request, options: { data: BunWebSocket['data']; headers?: Record<string, string> }): boolean;
  port: number;
  /** stops accepting; idle keep-alive connections close at once, busy ones after their response; true: all now */
  stop(closeActiveConnections?: boolean): Promise<void>;
  requestIP(req: Request): { address: string } | null;
}

async function bunRuntime(b: BunLike): Promise<Runtime> {
  const checkServerIdentity = subjectAltNameOnly(await import('node:tls'));
  const { readdirSync } = await import('node:fs');
  return {
    ...await nodeBuiltins(),
    name: 'bun',
    send: bunSend(checkServerIdentity),
    upgrade: nodeSend(await import('node:http'), await import('node:https') as unknown as NodeHttp, {
      pooled: false,
      checkServerIdentity,
    }),
    tlsByAddress: true,
    tlsLimits: { runtime: 'Bun', client: 'fetch', serverName: true },
    scheduleBatch: () => scheduleBatchOnBun(b, readdirSync),
    listen: (handler, host, port, work) => Promise.resolve(listenBun(b, handler, host, port, work)),
  };
}

/** SCHED_BATCH for every thread of the process (`/proc/self/task`), through libc's `sched_setscheduler` and Bun's
 * FFI; choosing it needs no privilege. A thread takes its policy from the thread that starts it, so the ones
 * started later are batch threads too: among them Bun's HTTP client thread, where its fetch reads the upstream's
 * answers. On a CPU that thread shares with the main thread (a pod's tenth of a core, a busy node) its every
 * wake-up preempted the main thread mid-request, about once a request; as a batch thread it waits for the main
 * thread's slice to end and then reads every answer that came meanwhile (README, Performance). */
function scheduleBatchOnBun(b: BunLike, readdir: (path: string) => string[]): void {
  if (!b.FFI) throw new Error('this Bun has no FFI');
  let libc: ReturnType<NonNullable<BunLike['FFI']>['dlopen']> | undefined;
  const failures: string[] = [];
  for (const name of ['libc.so.6', 'libc.musl-x86_64.so.1', 'libc.musl-aarch64.so.1']) {
    try {
      libc = b.FFI.dlopen(name, { sched_setscheduler: { args: ['i32', 'i32', 'ptr'], returns: 'i32' } });
      break;
    } catch (err) {
      failures.push(describeFailure(err));
    }
  }
  if (!libc) throw new Error(`no C library to ask: ${failures.join('; ')}`);
  try {
    const priority = new Int32Array(1); // struct sched_param: 0, the only priority SCHED_BATCH has
    const refused = readdir('/proc/self/task').filter((tid) =>
      libc.symbols.sched_setscheduler(Number(tid), SCHED_BATCH, priority) !== 0
    );
    // A thread that ended meanwhile refuses too; the main thread (the process's own id) is what must not.
    if (refused.includes(String(process.pid))) throw new Error('sched_setscheduler refused the main thread');
  } finally {
    libc.close();
  }
}

const SCHED_BATCH = 3; // <sched.h>

/** Bun's server stops accepting and closes idle connections itself (`stop`), at once: the drain lets it go
 * on accepting for DRAIN_IDLE_MS first (`settleMs`). A connection holding half a request head is not idle
 * to Bun, so once no request has been in flight for DRAIN_IDLE_MS what is left is closed. Its idle timeout
 * is off: Bun counts a request waiting on a slow upstream as idle (and allows at most 255 s), while
 * TRY_TIMEOUT_MS, REQUEST_TIMEOUT_MS and BODY_IDLE_TIMEOUT_MS already bound every wait; idle connections
 * are left to the app's client to close. The body size is not capped, as on the other runtimes. */
function listenBun(b: BunLike, handler: ProxyHandler, host: string, port: number, work: Work): Listener {
  let upgrade: Upgrader | undefined;
  const server = b.serve({
    hostname: host,
    port,
    idleTimeout: 0,
    maxRequestBodySize: Number.MAX_SAFE_INTEGER,
    fetch: async (req, srv) => {
      // Bun has no address for a connection that is closed, and asking costs far less than the request's
      // signal (`watchGoneLater`); one question gives both.
      const res = await handler(
        req,
        new FetchAppRequest(req, () => srv.requestIP(req), true, upgrade ??= upgradeOn(srv)),
      );
      if (res === BUN_UPGRADED) return undefined; // Bun answers an upgrade itself
      return req.method === 'HEAD' ? headAnswer(res, true) : res;
    },
    // What the app's WebSocket says goes to its tunnel. No compression (the upstream is offered none);
    // Bun's own idle cut is off: BODY_IDLE_TIMEOUT_MS is the tunnel's idle rule.
    websocket: {
      open: (ws) => ws.data.open(ws),
      message: (ws, m) => ws.data.message(m),
      close: (ws, code, reason) => ws.data.close(code, reason),
      perMessageDeflate: false,
      maxPayloadLength: WS_MAX_MESSAGE_BYTES,
      idleTimeout: 0,
    },
  });
  return {
    port: server.port,
    settleMs: DRAIN_IDLE_MS,
    close: () =>
      new Promise<void>((resolve) => {
        let quietSince = performance.now();
        const sweep = setInterval(() => {
          const now = performance.now();
          if (work.inFlight() > 0) quietSince = now;
          else if (now - quietSince >= DRAIN_IDLE_MS) void server.stop(true);
        }, 50);
        void server.stop().then(() => {
          clearInterval(sweep);
          resolve();
        });
      }),
    cutOff: () => void server.stop(true),
  };
}

/** The answer to a HEAD as Deno's and Bun's servers are to write it. Hono answers a HEAD with its GET's
 * head and no body, and for an answer with no body both servers write `Content-Length: 0`: where the
 * upstream gave no length (its GET's body comes chunked, or runs to its close), the app would be told that
 * body is empty. Deno's server writes neither a length nor chunking for an empty stream, as Node's does
 * for such a HEAD; Bun's writes a `Transfer-Encoding: chunked` it is given, the way it sends that GET's
 * body, and no body. */
function headAnswer(res: Response, direct: boolean): Response {
  if (res.headers.has('content-length') || res.status < 200 || NULL_BODY_STATUS.has(res.status)) return res;
  if (!direct) return new Response(new ReadableStream({ start: (c) => c.close() }), res);
  const headers = new Headers(res.headers);
  headers.set('transfer-encoding', 'chunked');
  return new Response(null, { status: res.status, statusText: res.statusText, headers });
}

/** What the handler answers once Bun's server has taken the app's handshake (`upgradeOn`). */
const BUN_UPGRADED = new Response(null, { status: 204 });

/** Bun's WebSocket upgrade, on the server the request came to. */
function upgradeOn(server: BunServer): Upgrader {
  return (request, tunnel, protocol) => {
    let relay: MessageRelay | undefined;
    const data: BunWebSocket['data'] = {
      open: (ws) =>
        relay = tunnel.messages({
          send: (m) => void ws.send(m),
          close: (code, reason) => ws.close(code, reason),
          buffered: () => ws.getBufferedAmount(),
        }),
      message: (m) => relay?.message(m),
      close: (code, reason) => (relay ??= tunnel.messages(CLOSED_SOCKET)).closed(code, reason),
    };
    if (server.upgrade(request, { data, headers: protocol ? { 'sec-websocket-protocol': protocol } : undefined })) {
      return BUN_UPGRADED;
    }
    data.close(1006, '');
    return new Response('ambassador: the WebSocket handshake could not be completed\n', { status: 400 });
  };
}

/** Bun's upstream client: its fetch, with the route's TLS material per request (`tls`). An address found
 * by discovery is reached as `fetchTarget` says, and for https:// the certificate is verified against the
 * upstream's name. */
function bunSend(checkServerIdentity: CheckServerIdentity): Send {
  return async (to, pathAndQuery, init) => {
    const { url, headers } = fetchTarget(to, pathAndQuery, init.headers);
    const tls = to.https
      ? {
        rejectUnauthorized: true,
        serverName: init.tls?.serverName ?? to.serverName,
        checkServerIdentity,
        ...(init.tls?.ca ? { ca: init.tls.ca } : {}),
        ...(init.tls?.cert && init.tls.key ? { cert: init.tls.cert, key: init.tls.key } : {}),
      }
      : undefined;
    let res: Response;
    try {
      res = await fetch(url, fetchInit(init, headers, { decompress: false, tls }));
    } catch (err) {
      if (init.cancel.aborted) throw init.cancel.reason;
      // A request Bun's fetch will not make is a TypeError with no code: nothing was sent.
      if (err instanceof TypeError && (err as { code?: string }).code === undefined) throw unsendable(err);
      throw bunFailure(err);
    }
    return replyOf(res, init.cancel);
  };
}

/** Bun's fetch names a failure by its `code` and adds the URL and a hint to the message: the code is kept
 * (`classifyFailure` reads it), the rest dropped; its unasked 101 is the same failure as on Node. */
function bunFailure(err: unknown): unknown {
  const { code, message } = err as { code?: unknown; message?: unknown };
  if (typeof code !== 'string' || typeof message !== 'string') return err;
  if (code === 'UnrequestedUpgrade') return unaskedUpgrade();
  const text = message.replace(/ fetching "[^"]*"/, '').replace(
    /\.? For more information, pass `verbose: true`[\s\S]*$/,
    '',
  );
  return Object.assign(new Error(text.startsWith(code) ? text : `${code}: ${text}`), { code });
}

// --- The admin port: one small server over node:net, the same on every runtime -----------------------------

/** The admin listener's bounds. It listens on every address by default (the kubelet's probes and
 * Prometheus come from outside the pod), so no client may hold it: one request per connection, its head
 * within ADMIN_HEAD_TIMEOUT_MS (a kubelet probe's own timeout is 1 s), and at most ADMIN_MAX_CONNECTIONS
 * at once, a new one taking the place of the oldest still waiting for its head, so idle connections can
 * neither use up the process's descriptors nor keep a probe out. (Deno's and Bun's servers have no idle or
 * head timeouts to set, and Node's allow a minute.) */
const ADMIN_HEAD_TIMEOUT_MS = 5_000;
const ADMIN_MAX_CONNECTIONS = 64;
const ADMIN_MAX_HEAD_BYTES = 8 * 1024;
const ADMIN_REASONS: Record<number, string> = {
  200: 'OK',
  202: 'Accepted',
  400: 'Bad Request',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  408: 'Request Timeout',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
};

/** The admin app's `fetch`: the request, and who sent it (Hono's `env`). */
type AdminHandler = (req: Request, env: AdminPeer) => Response | Promise<Response>;

/** Serves the admin app: reads one request head (no body: the admin endpoints take none), answers it, and
 * closes the connection. */
async function listenAdmin(handler: AdminHandler, host: string, port: number): Promise<Listener> {
  const net = await import('node:net');
  type Socket = InstanceType<typeof net.Socket>;
  const sockets = new Set<Socket>();
  const serving = new Set<Socket>(); // a request read, its answer not yet written: cutOff lets it finish
  const answer = (socket: Socket, status: number, headers: Array<[string, string]>, body: Uint8Array) => {
    let head = `HTTP/1.1 ${status} ${ADMIN_REASONS[status] ?? ''}\r\n`;
    for (const [name, value] of headers) {
      if (name !== 'content-length' && name !== 'connection' && name !== 'transfer-encoding') {
        head += `${name}: ${value}\r\n`;
      }
    }
    const bytes = new TextEncoder().encode(`${head}content-length: ${body.byteLength}\r\nconnection: close\r\n\r\n`);
    socket.end(concat([bytes, body], bytes.byteLength + body.byteLength));
  };
  const refuse = (socket: Socket, status: number, text: string) =>
    answer(
      socket,
      status,
      [['content-type', 'text/plain; charset=utf-8']],
      new TextEncoder().encode(`ambassador: ${text}\n`),
    );
  const serve = async (socket: Socket, head: string) => {
    const [line, ...fields] = head.split('\r\n');
    const request = /^([A-Z]{1,16}) (\/[\x21-\x7e]*) HTTP\/1\.[01]$/.exec(line);
    if (!request) return refuse(socket, 400, 'a request line that is not HTTP/1.1');
    const headers: Array<[string, string]> = [];
    for (const field of fields) {
      const m = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\x20-\x7e\t]*?)[ \t]*$/.exec(field);
      if (!m) return refuse(socket, 400, 'a header field that is not one');
      const name = m[1].toLowerCase();
      if ((name === 'content-length' && m[2] !== '0') || name === 'transfer-encoding') {
        return refuse(socket, 400, 'the admin endpoints take no request body');
      }
      headers.push([name, m[2]]);
    }
    const [, method, target] = request;
    let res: Response;
    try {
      res = await handler(new Request(`http://admin${target}`, { method, headers }), { peer: socket.remoteAddress });
    } catch {
      return refuse(socket, 400, 'a request the admin endpoints cannot read');
    }
    const body = method === 'HEAD' ? new Uint8Array(0) : new Uint8Array(await res.arrayBuffer());
    answer(socket, res.status, headerList(res.headers), body);
  };
  const server = net.createServer((socket) => {
    if (sockets.size >= ADMIN_MAX_CONNECTIONS) {
      for (const waiting of sockets) {
        if (serving.has(waiting)) continue;
        waiting.destroy();
        sockets.delete(waiting);
        break;
      }
    }
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', noop);
    // The whole head within the limit, counted from the connection: an idle timer would let a client that
    // drips a byte now and then hold the connection for as long as it likes. The answer is bounded too.
    const headTimer = setTimeout(() => socket.destroy(), ADMIN_HEAD_TIMEOUT_MS);
    socket.once('close', () => clearTimeout(headTimer));
    socket.setTimeout(ADMIN_HEAD_TIMEOUT_MS, () => socket.destroy());
    let head = '';
    const onData = (chunk: Uint8Array) => {
      head += new TextDecoder('latin1').decode(chunk);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0 && head.length <= ADMIN_MAX_HEAD_BYTES) return;
      clearTimeout(headTimer);
      socket.off('data', onData);
      if (end < 0 || end > ADMIN_MAX_HEAD_BYTES) return refuse(socket, 431, 'a request head larger than 8 KiB');
      serving.add(socket);
      void serve(socket, head.slice(0, end)).catch(() => socket.destroy()).finally(() => serving.delete(socket));
    };
    socket.on('data', onData);
  });
  return {
    port: await listenOnPort(server, host, port),
    settleMs: 0,
    // Stops accepting, closes what is not being answered, and resolves once every answer has gone out.
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) if (!serving.has(socket)) socket.destroy();
      }),
    cutOff: () => {
      server.close();
      for (const socket of sockets) socket.destroy();
    },
  };
}

// =========================================================================================================
// main: configure, listen, drain on SIGTERM; run only when this file is the program.
// =========================================================================================================

export async function main(): Promise<void> {
  const runtime = await runtimeOf(HOST);
  let config: Config;
  try {
    config = loadConfig(runtime.env(), runtime.readFile);
    checkRuntime(config, runtime);
    if (config.schedPolicy === 'batch') scheduleBatch(runtime);
  } catch (err) {
    console.error(`ambassador: ${err instanceof Error ? err.message : String(err)}`);
    return runtime.exit(2);
  }
  const lines = batchedLines(
    runtime.writeOut,
    (n) => log('warn', `${n} log lines dropped: stdout was not taking them`, { dropped: n }),
    runtime.writeOutAtExit,
  );
  const log = createLogger(config.logFormat, config.logLevel, lines.write);
  const exit = async (code: number): Promise<never> => {
    await lines.flush();
    return runtime.exit(code);
  };
  // The group's anonymous memory counts against the limit; without a group, the process's resident size.
  const group = runtime.memory();
  const memoryLimit = config.memoryLimitBytes || group?.limitBytes || null;
  const used = group ? () => group.used() : () => runtime.usage().rssBytes;
  const cpuCores = config.cpuLimitMillicores / 1000 || runtime.cpu();
  // A limit the runtime would not let it read is not a limit that is not there: told, with what gives it.
  const unread = [
    ...(memoryLimit === null ? ['MEMORY_LIMIT_BYTES'] : []),
    ...(cpuCores === null ? ['CPU_LIMIT_MILLICORES'] : []),
  ];
  const refused = unread.length > 0 ? cgroupRefused(runtime.readFile) : undefined;
  if (refused) {
    log('warn', `the cgroup's limits could not be read (${refused}): set ${unread.join(' and ')}`, { unread });
  }
  const amb = createAmbassador(config, runtime, { log, memory: { limitBytes: memoryLimit, used }, cpuCores });

  // Where the ambassador cannot listen is a configuration error too: it names the variables (exit 2).
  const listenOn = async (names: [string, string], host: string, port: number, listen: () => Promise<Listener>) => {
    try {
      return await listen();
    } catch (err) {
      const problems = new Problems();
      problems.together(
        [[{ variable: names[0] }, host], [{ variable: names[1] }, String(port)]],
        `an address of this machine and a port free on it (${describeFailure(err)})`,
      );
      console.error(`ambassador: ${new ConfigError(problems.list).message}`);
      return await exit(2);
    }
  };
  const work: Work = {
    uploadsRead: amb.uploadsRead,
    inFlight: () => amb.inFlight.size,
    failed: (error) => log('error', `unexpected error: ${error}`),
    warn: (message) => log('warn', message),
  };
  const proxy = await listenOn(
    ['HOST', 'PORT'],
    config.host,
    config.port,
    () => runtime.listen(amb.proxy.fetch as ProxyHandler, config.host, config.port, work),
  );
  const admin = await listenOn(
    ['ADMIN_HOST', 'ADMIN_PORT'],
    config.adminHost,
    config.adminPort,
    () => listenAdmin(amb.admin.fetch as AdminHandler, config.adminHost, config.adminPort),
  );
  let signalled = false;
  const onStop = (signal: string) => {
    // Only a second signal forces the exit: a drain begun by POST /shutdown goes on when SIGTERM follows.
    if (signalled) {
      log('warn', `second ${signal}: exiting now`, { in_flight: amb.inFlight.size });
      return void exit(1);
    }
    signalled = true;
    if (amb.draining) log('notice', `${signal}: a drain is already under way; a second signal exits at once`);
    else void drain(signal, config, amb, proxy, admin, log, exit);
  };
  // SIGTERM and SIGINT drain. SIGHUP, which would end the process at once by default, is ignored with a
  // log line: there is nothing to reload, and a closing terminal must not cut requests off.
  runtime.onSignal('SIGTERM', () => onStop('SIGTERM'));
  runtime.onSignal('SIGINT', () => onStop('SIGINT'));
  runtime.onSignal(
    'SIGHUP',
    () =>
      log(
        'notice',
        'SIGHUP ignored: the configuration is read once at start, and TLS files are taken up when they change',
      ),
  );
  amb.onShutdownRequest(() => amb.draining || void drain('POST /shutdown', config, amb, proxy, admin, log, exit));
  amb.metrics.gauges = { ...amb.metrics.gauges, connections: proxy.connections, logLinesDropped: () => lines.dropped };
  sampleEventLoopLag(amb);
  amb.markReady();
  log('notice', 'listening', {
    version: VERSION,
    runtime: runtime.name,
    port: proxy.port,
    admin_port: admin.port,
    memory_limit_bytes: memoryLimit,
    cpu_limit_cores: cpuCores,
    process_max_in_flight: amb.metrics.gauges.places?.().max,
    routes: config.routes.map((r) => ({ ...r, upstreams: r.upstreams.map((u) => u.href) })),
    config: { ...config, routes: undefined },
  });
}

/** SCHED_POLICY=batch, set before the first request, so the threads the runtime starts later (Bun's HTTP client
 * thread, at the first fetch) are batch threads too. A system that will not is a configuration error. */
function scheduleBatch(runtime: Runtime): void {
  try {
    runtime.scheduleBatch!();
  } catch (err) {
    const problems = new Problems();
    problems.add(
      { variable: 'SCHED_POLICY' },
      'batch',
      `normal, since this system would not run the process's threads under SCHED_BATCH (${describeFailure(err)})`,
    );
    problems.check();
  }
}

/** How late a 100 ms timer fires tells how busy the event loop is: a proxy that lags adds that to every
 * request, and one that lags by more than LOOP_BEHIND_MS is behind (`ioTurn`). */
function sampleEventLoopLag(amb: Ambassador): void {
  let expected = performance.now() + 100;
  setInterval(() => {
    const now = performance.now();
    amb.loopLate(Math.max(0, now - expected));
    expected = now + 100;
  }, 100);
}

/** The drain, as Kubernetes needs it: not ready at once; still serving for DRAIN_GRACE_MS (an app that
 * is itself draining may still call out); then no new connections, busy ones closed after their
 * response, idle ones closed again and again; exit 0 once nothing is left, or at DRAIN_TIMEOUT_MS. */
async function drain(
  signal: string,
  config: Config,
  amb: Ambassador,
  proxy: Listener,
  admin: Listener,
  log: Logger,
  exit: (code: number) => Promise<never>,
) {
  amb.startDrain();
  log('notice', `${signal}: drain started, /readyz now answers 503`, {
    in_flight: amb.inFlight.size,
    grace_ms: config.drainGraceMs,
    timeout_ms: config.drainTimeoutMs,
  });
  const deadline = performance.now() + config.drainTimeoutMs;
  const left = () => Math.max(0, deadline - performance.now());
  // The grace, then (Deno, Bun) the time the server must go on accepting before it can stop cleanly.
  const accepting = Math.min(config.drainGraceMs + proxy.settleMs, config.drainTimeoutMs);
  if (accepting > 0) await new Promise((r) => setTimeout(r, accepting));
  log('notice', 'drain: no longer accepting connections', { in_flight: amb.inFlight.size });
  amb.closeTunnels();
  const timedOut = await raceTimer(proxy.close().then(() => false), left(), () => true);
  if (timedOut) {
    const cut = [...amb.inFlight.values()].map((r) => ({ id: r.id, method: r.method, path: r.path }));
    log('warn', `drain: timed out after ${config.drainTimeoutMs} ms, cutting off ${cut.length} request(s)`, {
      cut_off: cut,
    });
    proxy.cutOff();
  }
  // The admin answers being written (the 202 to POST /shutdown among them) go out first, briefly.
  await raceTimer(admin.close(), 1000, noop);
  log('notice', 'drain complete, exiting', { exit_code: 0 });
  await exit(0);
}

/** Whether this file is the program, not a module a test imports. */
function isEntry(host: Host): boolean {
  if (host.name !== 'node') return (import.meta as { main?: boolean }).main === true;
  // A CommonJS bundle (the one a Node single executable is made from) has no import.meta: it is only
  // ever built to be the program.
  if (import.meta.url === undefined) return true;
  const script = process.argv[1];
  return script !== undefined && decodeURIComponent(new URL(import.meta.url).pathname) === script;
}

if (isEntry(HOST)) void main();
