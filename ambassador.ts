/**
 * ambassador — a small HTTP ambassador sidecar.
 *
 * The app talks plain HTTP to the ambassador on localhost; the ambassador forwards every request to one
 * upstream and deals with the network on the app's behalf: retries with backoff and a retry budget,
 * per-try and per-request timeouts, hop-by-hop hygiene, request ids, structured logs, and a graceful
 * drain on SIGTERM/SIGINT. A separate admin port serves GET /healthz, GET /readyz, GET /metrics
 * (Prometheus or OpenMetrics) and POST /shutdown (loopback clients only).
 *
 * Run it:
 *   Node:   npm run build && UPSTREAM_URL=http://127.0.0.1:9000 node dist/ambassador.mjs
 *   Deno:   UPSTREAM_URL=http://127.0.0.1:9000 deno run --allow-net --allow-env ambassador.ts
 *   Binary: npm run sea && UPSTREAM_URL=http://127.0.0.1:9000 ./bin/ambassador-node   (Node single executable)
 *           deno task compile && UPSTREAM_URL=http://127.0.0.1:9000 ./bin/ambassador  (needs Deno's denort)
 *
 * This file imports only `hono` and, on Node only and dynamically, `@hono/node-server` and Node's own
 * `node:http`/`node:https`, so it can be copied into another project as it is.
 *
 * | variable                 | default     | meaning                                                             |
 * |--------------------------|-------------|---------------------------------------------------------------------|
 * | UPSTREAM_URL             | (required)  | http:// or https:// base URL; the request path and query are appended |
 * | HOST / PORT              | 127.0.0.1 / 8080 | proxy listener; loopback so only the pod's app can use it; 0 = any free port |
 * | ADMIN_HOST / ADMIN_PORT  | 0.0.0.0 / 9901 | the admin endpoints, apart from every upstream path; 0 = any free port |
 * | RETRY_ATTEMPTS           | 3           | attempts in all, the first included; 1 = no retries                 |
 * | RETRY_BACKOFF_MS         | 100         | base of the exponential backoff (full jitter) between attempts      |
 * | RETRY_BACKOFF_MAX_MS     | 2000        | cap of one backoff delay                                            |
 * | RETRY_BUDGET_PERCENT     | 20          | retries allowed, as a percentage of requests over the last 10 s     |
 * | RETRY_BUDGET_MIN_PER_SEC | 10          | retries per second always allowed, whatever the percentage says     |
 * | RETRY_BODY_MAX_BYTES     | 65536       | largest request body kept in memory for replay; 0 = never replay a body |
 * | TRY_TIMEOUT_MS           | 5000        | one attempt's limit until response headers; 0 = none                |
 * | REQUEST_TIMEOUT_MS       | 15000       | the whole request's limit until response headers, retries included; 0 = none |
 * | DRAIN_TIMEOUT_MS         | 20000       | the longest a drain may take before what is left is cut off         |
 * | DRAIN_GRACE_MS           | 0           | after SIGTERM, keep accepting new requests this long (older clusters) |
 * | BODY_IDLE_TIMEOUT_MS     | 300000      | a response body that stalls this long is cut off (Envoy's stream idle timeout); 0 = never |
 * | LOG_FORMAT               | json        | json (one object per line) or text                                  |
 * | LOG_LEVEL                | info        | debug, info (one line per request), warn (failures only) or error   |
 */

import { Hono } from 'hono';
import type { Context } from 'hono';

// ---------------------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------------------

const VERSION = '0.1.0';
const VIA = '1.1 ambassador';

/** Hop-by-hop headers (RFC 9110 §7.6.1, https://www.rfc-editor.org/rfc/rfc9110#section-7.6.1), plus the
 * obsolete ones Go's ReverseProxy also drops; any header named in `Connection` is hop-by-hop too. */
const HOP_BY_HOP = [
  'connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization',
  'te', 'trailer', 'transfer-encoding', 'upgrade',
];
const HOP_BY_HOP_SET = new Set(HOP_BY_HOP);

/** RFC 9110 §9.2.2: a client may repeat these without changing the outcome. TRACE is idempotent too, but
 * fetch refuses to send it, so the ambassador refuses it (see `refusal`). */
const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE']);

/** Methods fetch cannot send (Fetch standard "forbidden method"): answered 405 on every runtime alike,
 * rather than forwarded on one and refused on the other. */
const REFUSED_METHODS = new Set(['CONNECT', 'TRACE', 'TRACK']);

/** Statuses that mean "the upstream, or what is in front of it, could not serve this now". */
const RETRYABLE_STATUS = new Set([502, 503, 504]);

/** Statuses whose response has no body (RFC 9110 §6.4.1); `new Response` refuses a body with them. */
const NULL_BODY_STATUS = new Set([101, 103, 204, 205, 304]);

const BUDGET_WINDOW_SECONDS = 10;

/** Node's default `maxHeaderSize`: the largest response head either runtime passes on. */
const MAX_RESPONSE_HEAD_BYTES = 16 * 1024;

// ---------------------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------------------

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
/** `notice` is for the lifecycle (start-up, drain stages): written whatever LOG_LEVEL says. */
type LineLevel = LogLevel | 'notice';
export type LogFormat = 'json' | 'text';

export interface Config {
  readonly upstream: URL;
  readonly host: string;
  readonly port: number;
  readonly adminHost: string;
  readonly adminPort: number;
  readonly retryAttempts: number;
  readonly retryBackoffMs: number;
  readonly retryBackoffMaxMs: number;
  readonly retryBudgetPercent: number;
  readonly retryBudgetMinPerSec: number;
  readonly retryBodyMaxBytes: number;
  readonly tryTimeoutMs: number;
  readonly requestTimeoutMs: number;
  readonly drainTimeoutMs: number;
  readonly drainGraceMs: number;
  readonly bodyIdleTimeoutMs: number;
  readonly logFormat: LogFormat;
  readonly logLevel: LogLevel;
}

/** Why an attempt produced no usable response. `refused` and `dns` mean the upstream cannot have seen
 * the request; every other kind means it may have. */
export type FailureKind = 'refused' | 'dns' | 'reset' | 'timeout' | 'tls' | 'protocol' | 'other';

/** What one attempt came to: a response status, or a failure. */
export type AttemptOutcome = { status: number } | { failure: FailureKind };

export type SkipReason = 'attempts' | 'method' | 'body' | 'deadline' | 'budget';

export type RetryDecision =
  | { retry: true; delayMs: number }
  | { retry: false; reason: 'final' | SkipReason };

export interface Logger {
  (level: LineLevel, msg: string, fields?: Record<string, unknown>): void;
}

/** What the handler reports; the log and the metrics subscribe. Policies never log. */
export interface Events {
  /** response headers arrived from the upstream, `seconds` after the attempt began */
  attemptResponded(e: { id: string; attempt: number; status: number; seconds: number }): void;
  attemptFailed(e: { id: string; attempt: number; error: string; kind: FailureKind | 'status'; status?: number; next: RetryDecision }): void;
  requestDone(e: RequestRecord): void;
}

export interface RequestRecord {
  id: string;
  method: string;
  path: string;
  status: number;
  attempts: number;
  durationMs: number;
  upstreamMs: number | null;
  bytesIn: number;
  bytesOut: number;
  error?: string;
}

/** A limit of ours ran out (per try, per request, body idle); `classifyFailure` calls it `timeout`. */
class TimeoutError extends Error {
  override name = 'TimeoutError';
}

// ---------------------------------------------------------------------------------------------------------
// Configuration: parsed once, by a pure function, into a frozen object — or one error naming every bad
// variable, its value and what was expected.
// ---------------------------------------------------------------------------------------------------------

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
    this.name = 'ConfigError';
  }
}

export function loadConfig(env: Record<string, string | undefined>): Config {
  const problems: string[] = [];
  const bad = (name: string, value: string, expected: string) => {
    problems.push(`${name}=${JSON.stringify(value)}: expected ${expected}`);
  };
  const read = (name: string) => {
    const v = env[name];
    return v === undefined || v.trim() === '' ? undefined : v.trim();
  };
  const int = (name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER) => {
    const v = read(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) {
      bad(name, v, `a whole number from ${min} to ${max === Number.MAX_SAFE_INTEGER ? 'any size' : max}`);
      return fallback;
    }
    return n;
  };
  const oneOf = <T extends string>(name: string, fallback: T, allowed: readonly T[]): T => {
    const v = read(name);
    if (v === undefined) return fallback;
    if (!(allowed as readonly string[]).includes(v.toLowerCase())) {
      bad(name, v, `one of ${allowed.join(', ')}`);
      return fallback;
    }
    return v.toLowerCase() as T;
  };

  let upstream = new URL('http://invalid.invalid/');
  const rawUpstream = read('UPSTREAM_URL');
  if (rawUpstream === undefined) {
    problems.push('UPSTREAM_URL is not set: expected the upstream base URL, e.g. http://inventory-service:9000');
  } else {
    const expected = 'an http:// or https:// URL with a host and no credentials, query or fragment';
    try {
      const u = new URL(rawUpstream);
      if ((u.protocol !== 'http:' && u.protocol !== 'https:') || !u.hostname || u.username || u.password ||
        u.search || u.hash) {
        bad('UPSTREAM_URL', rawUpstream, expected);
      } else upstream = u;
    } catch {
      bad('UPSTREAM_URL', rawUpstream, expected);
    }
  }

  const config: Config = {
    upstream,
    host: read('HOST') ?? '127.0.0.1',
    port: int('PORT', 8080, 0, 65535),
    adminHost: read('ADMIN_HOST') ?? '0.0.0.0',
    adminPort: int('ADMIN_PORT', 9901, 0, 65535),
    retryAttempts: int('RETRY_ATTEMPTS', 3, 1, 100),
    retryBackoffMs: int('RETRY_BACKOFF_MS', 100, 0),
    retryBackoffMaxMs: int('RETRY_BACKOFF_MAX_MS', 2000, 0),
    retryBudgetPercent: int('RETRY_BUDGET_PERCENT', 20, 0, 100),
    retryBudgetMinPerSec: int('RETRY_BUDGET_MIN_PER_SEC', 10, 0),
    retryBodyMaxBytes: int('RETRY_BODY_MAX_BYTES', 64 * 1024, 0),
    tryTimeoutMs: int('TRY_TIMEOUT_MS', 5000, 0),
    requestTimeoutMs: int('REQUEST_TIMEOUT_MS', 15000, 0),
    drainTimeoutMs: int('DRAIN_TIMEOUT_MS', 20000, 0),
    drainGraceMs: int('DRAIN_GRACE_MS', 0, 0),
    bodyIdleTimeoutMs: int('BODY_IDLE_TIMEOUT_MS', 300_000, 0),
    logFormat: oneOf<LogFormat>('LOG_FORMAT', 'json', ['json', 'text']),
    logLevel: oneOf<LogLevel>('LOG_LEVEL', 'info', ['debug', 'info', 'warn', 'error']),
  };
  if (config.port !== 0 && config.port === config.adminPort && config.host === config.adminHost) {
    problems.push(`ADMIN_PORT=${JSON.stringify(String(config.adminPort))}: expected a port other than PORT`);
  }
  if (config.retryBackoffMaxMs < config.retryBackoffMs) {
    bad('RETRY_BACKOFF_MAX_MS', String(config.retryBackoffMaxMs),
      `a value at least RETRY_BACKOFF_MS (${config.retryBackoffMs})`);
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return Object.freeze(config);
}

// ---------------------------------------------------------------------------------------------------------
// Pure policies: no I/O, no clock, no randomness of their own — `now` and `random` come in as arguments.
// ---------------------------------------------------------------------------------------------------------

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
  retryAfterMs: number | undefined;
  backoffMs: number;
  remainingMs: number; // until the request's deadline; Infinity when there is none
}

/** The whole retry decision in one place. The order matters for what is reported: a request that was not
 * retryable anyway is `final`; one that would have been retried says what stopped it. */
export function decideRetry(i: RetryInput): RetryDecision {
  if (!worthRetrying(i.outcome)) return { retry: false, reason: 'final' };
  if (i.attempt >= i.maxAttempts) return { retry: false, reason: 'attempts' };
  if (!isRetryableOutcome(i.outcome, i.method, i.idempotencyKey)) return { retry: false, reason: 'method' };
  if (!i.bodyReplayable) return { retry: false, reason: 'body' };
  // Retry-After is the upstream telling us when it can take the request again: honour it when it fits.
  const delayMs = i.retryAfterMs ?? i.backoffMs;
  if (delayMs >= i.remainingMs) return { retry: false, reason: 'deadline' };
  if (!i.budgetAvailable) return { retry: false, reason: 'budget' };
  return { retry: true, delayMs };
}

/** A retry budget (after Linkerd's and Envoy's): retries may be at most `percent` of the requests of the
 * last ten seconds, plus `minPerSec` per second, so a dead upstream never sees 3× its normal load
 * (envoy#9069 is the retry storm this prevents). Counts live in one-second buckets; `now` is passed in. */
export class RetryBudget {
  private readonly requests = new Array<number>(BUDGET_WINDOW_SECONDS).fill(0);
  private readonly retries = new Array<number>(BUDGET_WINDOW_SECONDS).fill(0);
  private second = 0;

  constructor(private readonly percent: number, private readonly minPerSec: number) {}

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

/** Names the failure behind a rejected fetch. Node's fetch wraps a system error code in `cause`; Deno
 * says it in the message. Both are read, so the same kinds come out on either runtime. */
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
  if (/ECONNRESET|EPIPE|UND_ERR_SOCKET|other side closed|connection reset|connection closed|broken pipe|closed before/i.test(text)) return 'reset';
  if (/HPE_|UND_ERR_INFO|invalid HTTP|parse|UND_ERR_HEADERS_OVERFLOW/i.test(text)) return 'protocol';
  return 'other';
}

/** One short line for logs and error bodies, in the spirit of Go's `dial tcp: connection refused`. */
export function describeFailure(err: unknown): string {
  const cause = (err as { cause?: { code?: string; message?: string } }).cause ?? (err as { code?: string; message?: string });
  if (cause?.code && cause.message) return cause.message.includes(cause.code) ? cause.message : `${cause.code} ${cause.message}`;
  if (cause?.message) return cause.message;
  return err instanceof Error ? err.message : String(err);
}

/** Headers as the wire has them: [name, value] pairs in order, names lower-case, repeats kept. Plain
 * arrays cost far less than `Headers` objects on the hot path, and both runtimes take them as they are. */
export type HeaderList = Array<[string, string]>;

export function headerValue(headers: HeaderList, name: string): string | null {
  for (const [k, v] of headers) if (k === name) return v;
  return null;
}

/** The headers without hop-by-hop ones and without every header `Connection` names. */
export function stripHopByHop(headers: HeaderList): HeaderList {
  let drop = HOP_BY_HOP_SET;
  for (const [name, value] of headers) {
    if (name !== 'connection') continue; // every Connection header counts, not only the first
    if (drop === HOP_BY_HOP_SET) drop = new Set(HOP_BY_HOP);
    for (const named of value.split(',')) drop.add(named.trim().toLowerCase());
  }
  return headers.filter(([name]) => !drop.has(name));
}

/** The upstream URL for a request: the upstream's base path, then the request's path and query exactly
 * as they were sent (percent-encoding kept). Never the request's own host: the ambassador is no open proxy. */
export function upstreamUrl(base: URL, pathAndQuery: string): string {
  const basePath = base.pathname.endsWith('/') ? base.pathname.slice(0, -1) : base.pathname;
  return `${base.origin}${basePath}${pathAndQuery}`;
}

/** The request headers the upstream gets. */
export function forwardHeaders(incoming: HeaderList, id: string, clientAddress: string | undefined): HeaderList {
  let host: string | null = null;
  let forwardedFor: string | null = null;
  let via: string | null = null;
  let proto = false;
  let forwardedHost = false;
  const out: HeaderList = [];
  for (const [name, value] of stripHopByHop(incoming)) {
    switch (name) {
      // The client sets Host from the upstream URL, so the upstream sees its own authority.
      case 'host': host = value; break;
      // The ambassador has already answered `100 Continue` to the app (Node's fetch refuses to send Expect).
      case 'expect': break;
      // Replaced below.
      case 'accept-encoding': case 'x-request-id': break;
      case 'x-forwarded-for': forwardedFor = forwardedFor ? `${forwardedFor}, ${value}` : value; break;
      case 'via': via = via ? `${via}, ${value}` : value; break;
      case 'x-forwarded-proto': proto = true; out.push([name, value]); break;
      case 'x-forwarded-host': forwardedHost = true; out.push([name, value]); break;
      default: out.push([name, value]);
    }
  }
  // Ask for the body as it is. Deno's fetch decodes gzip and br for any other value yet keeps the
  // `content-encoding` header, which would hand the app a decoded body labelled as compressed.
  out.push(['accept-encoding', 'identity'], ['x-request-id', id]);
  if (clientAddress) out.push(['x-forwarded-for', forwardedFor ? `${forwardedFor}, ${clientAddress}` : clientAddress]);
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
  for (const [name, value] of stripHopByHop(upstream)) {
    if (name === 'via') via = via ? `${via}, ${value}` : value;
    else if (name !== 'x-request-id') out.push([name, value]);
  }
  out.push(['x-request-id', id], ['via', via ? `${via}, ${VIA}` : VIA]);
  return out;
}

/** One place maps a failure to what the app receives: 502 when the upstream could not be reached or
 * answered nonsense, 504 when it was too slow, 503 while the ambassador refuses work. Plain text, short,
 * saying what failed and after how many attempts. */
export function failureReply(kind: FailureKind, detail: string, attempts: number, id: string): Reply {
  const tries = attempts === 1 ? '1 attempt' : `${attempts} attempts`;
  return textReply(kind === 'timeout' ? 504 : 502, `ambassador: upstream ${kind === 'timeout' ? 'timed out' : 'failed'}: ${detail} (${tries})\n`, id);
}

function textReply(status: number, text: string, id: string): Reply {
  const bytes = new TextEncoder().encode(text);
  return {
    status, statusText: '', body: new Blob([bytes]).stream(),
    headers: [['content-type', 'text/plain; charset=utf-8'], ['content-length', String(bytes.byteLength)], ['x-request-id', id], ['via', VIA]],
  };
}

// ---------------------------------------------------------------------------------------------------------
// Logging: one line per event, JSON or text, to stdout.
// ---------------------------------------------------------------------------------------------------------

const LEVELS: Record<LineLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, notice: 100 };

export function createLogger(format: LogFormat, minLevel: LogLevel, write: (line: string) => void = console.log): Logger {
  const min = LEVELS[minLevel];
  return (level, msg, fields = {}) => {
    if (LEVELS[level] < min) return;
    const time = new Date().toISOString();
    if (format === 'json') {
      write(JSON.stringify({ time, level, msg, ...fields }));
    } else {
      const rest = Object.entries(fields).map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`);
      write(`${time} ${level.toUpperCase().padEnd(6)} ${msg}${rest.length ? ' ' + rest.join(' ') : ''}`);
    }
  };
}

function logEvents(log: Logger): Events {
  return {
    attemptResponded(e) {
      log('debug', 'upstream responded', { id: e.id, attempt: e.attempt, status: e.status, upstream_ms: round(e.seconds * 1000) });
    },
    attemptFailed(e) {
      const then = e.next.retry ? `retrying in ${e.next.delayMs} ms` : `giving up (${e.next.reason})`;
      log('warn', `attempt ${e.attempt} failed: ${e.error}; ${then}`, {
        id: e.id, attempt: e.attempt, kind: e.kind, status: e.status,
        ...(e.next.retry ? { retry_in_ms: e.next.delayMs } : { skip: e.next.reason }),
      });
    },
    requestDone(r) {
      log(r.status >= 500 ? 'warn' : 'info', 'request', {
        id: r.id, method: r.method, path: r.path, status: r.status, attempts: r.attempts,
        duration_ms: round(r.durationMs), upstream_ms: r.upstreamMs === null ? null : round(r.upstreamMs),
        bytes_in: r.bytesIn, bytes_out: r.bytesOut, ...(r.error ? { error: r.error } : {}),
      });
    },
  };
}

const round = (ms: number) => Math.round(ms * 100) / 100;

// ---------------------------------------------------------------------------------------------------------
// Metrics: counters and histograms fed by the same events as the log, written out in the Prometheus text
// format (or OpenMetrics when the scraper asks). Names follow Prometheus practice and echo Envoy's
// `upstream_rq_*` and Linkerd's `response_total`, so an operator finds what they expect.
// ---------------------------------------------------------------------------------------------------------

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
  connections?(): number; // Node only: Deno.serve does not expose its connections
}

export class Metrics {
  readonly requests = new Map<string, number>(); // `${method} ${code}`
  readonly duration = new Histogram();
  readonly upstreamTime = new Histogram();
  readonly attemptFailures = new Map<string, number>();
  readonly retriesSkipped = new Map<string, number>();
  retries = 0;
  eventLoopLagSeconds = 0;
  gauges: Gauges = { inFlight: () => 0, draining: () => false };

  constructor(readonly info: { version: string; runtime: string; startTimeSeconds: number }) {}

  events(): Events {
    const add = (map: Map<string, number>, key: string) => map.set(key, (map.get(key) ?? 0) + 1);
    return {
      attemptResponded: (e) => this.upstreamTime.observe(e.seconds),
      attemptFailed: (e) => {
        add(this.attemptFailures, e.kind === 'status' ? String(e.status) : e.kind);
        if (e.next.retry) this.retries++;
        else if (e.next.reason !== 'final') add(this.retriesSkipped, e.next.reason);
      },
      requestDone: (r) => {
        add(this.requests, `${METHOD_LABELS.has(r.method) ? r.method : 'other'} ${r.status}`);
        this.duration.observe(r.durationMs / 1000);
      },
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
    const labels = (pairs: Record<string, string>) => {
      const inner = Object.entries(pairs).map(([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`);
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

    family('ambassador_requests_total', 'counter', 'Requests answered to the app, by method and status code (499: the app went away).');
    for (const [key, n] of this.requests) {
      const [method, code] = key.split(' ');
      out.push(`ambassador_requests_total${labels({ method, code })} ${n}`);
    }
    family('ambassador_request_duration_seconds', 'histogram', 'Time from the request arriving to the end of its response body.');
    histogram('ambassador_request_duration_seconds', this.duration);
    family('ambassador_upstream_response_seconds', 'histogram', 'Time from sending an attempt to the upstream\'s response headers.');
    histogram('ambassador_upstream_response_seconds', this.upstreamTime);
    family('ambassador_upstream_attempt_failures_total', 'counter', 'Attempts that failed, by reason: refused, dns, reset, timeout, tls, protocol, other, or the 502/503/504 status.');
    for (const [reason, n] of this.attemptFailures) out.push(`ambassador_upstream_attempt_failures_total${labels({ reason })} ${n}`);
    family('ambassador_upstream_retries_total', 'counter', 'Retries sent to the upstream.');
    out.push(`ambassador_upstream_retries_total ${this.retries}`);
    family('ambassador_upstream_retries_skipped_total', 'counter', 'Retries that were due but not sent, by reason: attempts, method, body, deadline, budget.');
    for (const [reason, n] of this.retriesSkipped) out.push(`ambassador_upstream_retries_skipped_total${labels({ reason })} ${n}`);
    family('ambassador_requests_in_flight', 'gauge', 'Requests not yet answered in full.');
    out.push(`ambassador_requests_in_flight ${this.gauges.inFlight()}`);
    if (this.gauges.connections) {
      family('ambassador_downstream_connections', 'gauge', 'Open connections from the app.');
      out.push(`ambassador_downstream_connections ${this.gauges.connections()}`);
    }
    family('ambassador_draining', 'gauge', '1 from the moment a drain starts.');
    out.push(`ambassador_draining ${this.gauges.draining() ? 1 : 0}`);
    family('ambassador_event_loop_lag_seconds', 'gauge', 'How late the last event-loop timer fired.');
    out.push(`ambassador_event_loop_lag_seconds ${this.eventLoopLagSeconds}`);
    family('ambassador_build_info', 'gauge', 'Always 1; the labels say which build and runtime this is.');
    out.push(`ambassador_build_info${labels({ version: this.info.version, runtime: this.info.runtime })} 1`);
    family('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.');
    out.push(`process_resident_memory_bytes ${process.memoryUsage.rss()}`);
    const cpu = process.cpuUsage();
    family('process_cpu_seconds_total', 'counter', 'User and system CPU time spent, in seconds.');
    out.push(`process_cpu_seconds_total ${(cpu.user + cpu.system) / 1e6}`);
    family('process_start_time_seconds', 'gauge', 'Start time of the process since the Unix epoch, in seconds.');
    out.push(`process_start_time_seconds ${this.info.startTimeSeconds}`);
    if (openMetrics) out.push('# EOF');
    return out.join('\n') + '\n';
  }
}

function fanOut(...all: Events[]): Events {
  return {
    attemptResponded: (e) => all.forEach((x) => x.attemptResponded(e)),
    attemptFailed: (e) => all.forEach((x) => x.attemptFailed(e)),
    requestDone: (e) => all.forEach((x) => x.requestDone(e)),
  };
}

// ---------------------------------------------------------------------------------------------------------
// Bodies: a request body is kept for replay only when it is small; a response body is always streamed.
// ---------------------------------------------------------------------------------------------------------

interface ForwardBody {
  /** what to hand fetch for one attempt */
  take(): Uint8Array | ReadableStream<Uint8Array> | null;
  replayable: boolean;
  bytes(): number;
  /** settles once the whole body has gone to fetch: timeouts count from then, as Envoy's do, so a
   * large upload is not cut off for taking longer than TRY_TIMEOUT_MS to send */
  sent: Promise<void>;
}

/** Reads at most `limit` bytes of a request body. Small bodies are kept whole and can be sent again; a
 * larger one goes on as a stream (what was read, then the rest), sent once (Envoy's silent skip is
 * envoy#29386: here the log says so). */
async function prepareBody(body: ReadableStream<Uint8Array> | null, declared: number | undefined, limit: number): Promise<ForwardBody> {
  if (body === null) return { take: () => null, replayable: true, bytes: () => 0, sent: Promise.resolve() };
  let streamed = 0;
  let markSent!: () => void;
  const sent = new Promise<void>((resolve) => (markSent = resolve));
  const counted = (stream: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> => stream.pipeThrough(new TransformStream({
    transform(chunk, c) {
      streamed += chunk.byteLength;
      c.enqueue(chunk);
    },
    flush: () => markSent(),
  }));
  if (declared !== undefined && declared > limit) {
    return { take: once(counted(body)), replayable: false, bytes: () => streamed, sent };
  }
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    size += value.byteLength;
    if (size > limit) {
      const rest = new ReadableStream<Uint8Array>({
        start(c) { for (const chunk of chunks) c.enqueue(chunk); },
        async pull(c) {
          const next = await reader.read();
          if (next.done) c.close();
          else c.enqueue(next.value);
        },
        cancel(reason) { return reader.cancel(reason); },
      }, { highWaterMark: 0 });
      return { take: once(counted(rest)), replayable: false, bytes: () => streamed, sent };
    }
  }
  const whole = chunks.length === 1 ? chunks[0] : concat(chunks, size);
  return { take: () => whole, replayable: true, bytes: () => size, sent: Promise.resolve() };
}

/** A Node stream as a web stream that reads only as fast as its consumer takes it (Node 20's
 * Readable.toWeb queues up to 16384 chunks ahead). Cancelling it destroys the Node stream. */
function streamFromNode(incoming: AsyncIterable<Uint8Array>): ReadableStream<Uint8Array> {
  const it = incoming[Symbol.asyncIterator]();
  return new ReadableStream<Uint8Array>({
    async pull(c) {
      const next = await it.next();
      if (next.done) c.close();
      else c.enqueue(next.value);
    },
    async cancel(reason) {
      await it.return?.(reason);
    },
  }, { highWaterMark: 0 });
}

function once<T>(value: T): () => T | null {
  let used = false;
  return () => (used ? null : ((used = true), value));
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

/** Passes a response body through chunk by chunk (highWaterMark 0: nothing is read ahead, so server-sent
 * events reach the app as the upstream sends them), counting bytes and telling how it ended. An upstream
 * error mid-body errors this stream, so the app sees a broken response, never a short one that looks whole. */
function trackBody(body: ReadableStream<Uint8Array>, idleMs: number, done: (bytes: number, error?: string) => void): ReadableStream<Uint8Array> {
  const reader = body.getReader();
  let bytes = 0;
  let ended = false;
  const end = (error?: string) => {
    if (!ended) (ended = true), done(bytes, error);
  };
  /** The next chunk, or a rejection once the upstream has sent nothing for `idleMs`. */
  const read = () => {
    if (idleMs <= 0) return reader.read();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const idle = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const err = new TimeoutError(`no body bytes for ${idleMs} ms`);
        void reader.cancel(err).catch(() => {});
        reject(err);
      }, idleMs);
    });
    return Promise.race([reader.read(), idle]).finally(() => clearTimeout(timer));
  };
  return new ReadableStream<Uint8Array>({
    async pull(c) {
      try {
        const next = await read();
        if (next.done) {
          c.close();
          end();
        } else {
          bytes += next.value.byteLength;
          c.enqueue(next.value);
        }
      } catch (err) {
        end(`upstream body failed: ${describeFailure(err)}`);
        c.error(err);
      }
    },
    cancel(reason) {
      end('client went away during the response body');
      return reader.cancel(reason);
    },
  }, { highWaterMark: 0 });
}

/** The parts of Node's streams the Node path uses, so this file needs no Node types. */
interface NodeReadable extends AsyncIterable<Uint8Array> {
  pipe(to: NodeOutgoing): void;
  setTimeout(ms: number, f: () => void): void;
  resume(): void;
  destroy(err?: Error): void;
  on(event: 'data', f: (chunk: Uint8Array) => void): void;
  on(event: 'error', f: (err: Error) => void): void;
}
interface NodeOutgoing {
  writeHead(status: number, statusText: string, headers: string[]): void;
  destroy(): void;
  readonly writableFinished: boolean;
  readonly destroyed: boolean;
  on(event: 'finish' | 'close', f: () => void): void;
}

/** A reply's body as a web stream, made from the Node stream only where one is needed. */
function bodyOf(reply: Reply): ReadableStream<Uint8Array> | null {
  return reply.node ? streamFromNode(reply.node) : reply.body;
}

/** Lets go of a reply not passed on: its body is read to the end (Node) or cancelled (fetch). */
function discard(reply: Reply): void {
  if (reply.node) reply.node.resume();
  else reply.body?.cancel().catch(() => {});
}

/** Node: writes the response head, then pipes the upstream body into the app's connection with Node's own
 * backpressure, counting bytes. An upstream failure mid-body destroys the app's connection (the app sees
 * a broken response, never a short one that looks whole); the app going away destroys the upstream's. */
function pipeNode(body: NodeReadable, outgoing: NodeOutgoing, reply: Reply, idleMs: number, done: (bytes: number, error?: string) => void): void {
  if (outgoing.destroyed) { // the app left while the headers were on their way
    body.destroy();
    return done(0, 'client went away before the response');
  }
  outgoing.writeHead(reply.status, reply.statusText, reply.headers.flat());
  let bytes = 0;
  let ended = false;
  const end = (error?: string) => {
    if (!ended) (ended = true), done(bytes, error);
  };
  body.on('data', (chunk) => (bytes += chunk.byteLength));
  // The upstream socket's own inactivity timer: a body that stalls is cut off like a broken one.
  if (idleMs > 0) body.setTimeout(idleMs, () => body.destroy(new TimeoutError(`no body bytes for ${idleMs} ms`)));
  body.on('error', (err) => {
    end(`upstream body failed: ${describeFailure(err)}`);
    outgoing.destroy();
  });
  outgoing.on('finish', () => end());
  outgoing.on('close', () => {
    if (outgoing.writableFinished) return;
    end('client went away during the response body');
    body.destroy();
  });
  body.pipe(outgoing);
}

// ---------------------------------------------------------------------------------------------------------
// The proxy handler: retry( timeout( fetch ) ), written out.
// ---------------------------------------------------------------------------------------------------------

/** What the runtime adapters pass as Hono's `env`: the raw request target and the peer's address. */
export interface Bindings {
  incoming?: { url?: string; rawHeaders?: string[]; socket?: { remoteAddress?: string } }; // @hono/node-server
  outgoing?: NodeOutgoing; // @hono/node-server
  remoteAddr?: string; // Deno adapter
}

/** One answer from the upstream, whichever client fetched it: a web body (fetch) or a Node stream. */
export interface Reply {
  status: number;
  statusText: string;
  headers: HeaderList;
  body: ReadableStream<Uint8Array> | null;
  node?: NodeReadable;
}

/** How one attempt reaches the upstream: `fetch` on Deno, `node:http` on Node (see `nodeSend`). */
export type Send = (url: string, init: { method: string; headers: HeaderList; body: Uint8Array | ReadableStream<Uint8Array> | null; signal: AbortSignal }) => Promise<Reply>;

const fetchSend: Send = async (url, init) => {
  // `duplex: 'half'` lets fetch send a streamed body; redirects are the app's business, not ours.
  const res = await fetch(url, { ...init, redirect: 'manual', duplex: 'half' } as RequestInit);
  const headers = [...res.headers];
  // Node's client refuses response heads over 16 KiB; Deno's takes far more. Hold both to Node's limit, so
  // the app (whose own client likely has it too) gets a clean 502 rather than a response it cannot read.
  if (headers.reduce((n, [k, v]) => n + k.length + v.length + 4, 0) > MAX_RESPONSE_HEAD_BYTES) {
    await res.body?.cancel();
    throw Object.assign(new Error(`response headers larger than ${MAX_RESPONSE_HEAD_BYTES} bytes`), { code: 'HPE_HEADER_OVERFLOW' });
  }
  return { status: res.status, statusText: res.statusText, headers, body: res.body };
};

export interface Clock {
  now(): number;
  random(): number;
}

const systemClock: Clock = { now: () => performance.timeOrigin + performance.now(), random: Math.random };

interface InFlight {
  method: string;
  path: string;
  started: number;
}

export interface Ambassador {
  /** The proxy app (listens on HOST:PORT). */
  proxy: Hono<{ Bindings: Bindings }>;
  /** The admin app (listens on ADMIN_HOST:ADMIN_PORT). */
  admin: Hono<{ Bindings: Bindings }>;
  /** Requests not yet answered in full, by request id. */
  inFlight: Map<string, InFlight>;
  metrics: Metrics;
  markReady(): void;
  startDrain(): void;
  /** what `POST /shutdown` on the admin port does (main: start the drain) */
  onShutdownRequest(f: () => void): void;
  readonly draining: boolean;
}

/** Sleeps `ms`, or until `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const onAbort = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

export function createAmbassador(config: Config, options: {
  log?: Logger; clock?: Clock; metrics?: Metrics; send?: Send;
  /** @hono/node-server's "the handler wrote the response itself" (RESPONSE_ALREADY_SENT), for the Node path */
  written?: Response;
} = {}): Ambassador {
  const log = options.log ?? createLogger(config.logFormat, config.logLevel);
  const clock = options.clock ?? systemClock;
  const metrics = options.metrics ?? new Metrics({ version: VERSION, runtime: deno ? 'deno' : 'node', startTimeSeconds: Date.now() / 1000 });
  const events = fanOut(logEvents(log), metrics.events());
  const send = options.send ?? fetchSend;
  const budget = new RetryBudget(config.retryBudgetPercent, config.retryBudgetMinPerSec);
  const inFlight = new Map<string, InFlight>();
  let ready = false;
  let draining = false;

  /** One attempt: fetch until response headers arrive or `limitMs` passes. The client's abort reaches the
   * upstream through the same controller, before and after the headers. */
  async function attempt(url: string, init: Omit<Parameters<Send>[1], 'signal'>, limitMs: number, client: AbortSignal, bodySent: Promise<void>): Promise<Reply> {
    const controller = new AbortController();
    const onClientAbort = () => controller.abort(client.reason);
    if (client.aborted) onClientAbort();
    else client.addEventListener('abort', onClientAbort, { once: true });
    let timer: ReturnType<typeof setTimeout> | undefined;
    let settled = false;
    if (Number.isFinite(limitMs)) {
      void bodySent.then(() => {
        if (settled) return;
        timer = setTimeout(() => controller.abort(new TimeoutError(`no response headers within ${Math.round(limitMs)} ms`)), limitMs);
      });
    }
    try {
      return await send(url, { ...init, signal: controller.signal });
    } catch (err) {
      client.removeEventListener('abort', onClientAbort);
      // fetch rejects with a generic AbortError; the reason says whether it was our timer.
      throw controller.signal.aborted ? controller.signal.reason : err;
    } finally {
      settled = true;
      clearTimeout(timer);
    }
  }

  async function handle(c: Context<{ Bindings: Bindings }>): Promise<Response> {
    const req = c.req.raw;
    const started = clock.now();
    const incomingHeaders = headerList(c);
    const id = headerValue(incomingHeaders, 'x-request-id') || crypto.randomUUID();
    const rawTarget = c.env?.incoming?.url;
    const url = new URL(req.url);
    const pathAndQuery = rawTarget?.startsWith('/') ? rawTarget : url.pathname + url.search;

    const refused = refusal(req.method, rawTarget, url, headerValue(incomingHeaders, 'host'));
    if (refused) {
      const res = new Response(`ambassador: ${refused.reason}\n`, {
        status: refused.status,
        headers: { 'content-type': 'text/plain; charset=utf-8', 'x-request-id': id, ...refused.headers },
      });
      events.requestDone({ id, method: req.method, path: url.pathname, status: refused.status, attempts: 0,
        durationMs: clock.now() - started, upstreamMs: null, bytesIn: 0, bytesOut: 0, error: refused.reason });
      return res;
    }

    inFlight.set(id, { method: req.method, path: url.pathname, started });
    const record: RequestRecord = { id, method: req.method, path: url.pathname, status: 0, attempts: 0,
      durationMs: 0, upstreamMs: null, bytesIn: 0, bytesOut: 0 };
    // One listener on the app's signal per request, removed when the response is done: Deno aborts
    // request.signal after a successful response too, and that must not reach a finished exchange.
    const gone = new AbortController();
    const onGone = () => gone.abort(req.signal.reason);
    req.signal.addEventListener('abort', onGone, { once: true });
    const finish = (bytesOut: number, error?: string) => {
      req.signal.removeEventListener('abort', onGone);
      inFlight.delete(id);
      record.durationMs = clock.now() - started;
      record.bytesOut = bytesOut;
      if (error && !record.error) record.error = error;
      events.requestDone(record);
    };

    try {
      const reply = await forward(req.method, incomingHeaders, requestBody(c), gone.signal, id, pathAndQuery, started, clientAddress(c), record);
      if (draining) reply.headers.push(['connection', 'close']); // the app opens a fresh connection for its next call
      record.status = reply.status;
      const outgoing = c.env?.outgoing;
      if (reply.node && outgoing && options.written) {
        // Node: the upstream's body goes straight into the app's connection, no web streams between.
        pipeNode(reply.node, outgoing, reply, config.bodyIdleTimeoutMs, finish);
        return options.written;
      }
      const body = bodyOf(reply);
      if (body === null) finish(0);
      return new Response(body && trackBody(body, config.bodyIdleTimeoutMs, finish), { status: reply.status, statusText: reply.statusText, headers: reply.headers });
    } catch (err) {
      // Only a client that went away gets here: everything else became a response in `forward`.
      record.status = 499;
      finish(0, `client went away: ${describeFailure(err)}`);
      return new Response(null, { status: 499 });
    }
  }

  async function forward(method: string, incoming: HeaderList, reqBody: ReadableStream<Uint8Array> | null, gone: AbortSignal, id: string,
    pathAndQuery: string, started: number, client: string | undefined, record: RequestRecord): Promise<Reply> {
    const target = upstreamUrl(config.upstream, pathAndQuery);
    const idempotencyKey = headerValue(incoming, 'idempotency-key') !== null;
    const declared = headerValue(incoming, 'content-length');
    const body = await prepareBody(reqBody, declared === null ? undefined : Number(declared), config.retryBodyMaxBytes);
    const headers = forwardHeaders(incoming, id, client);
    const deadline = config.requestTimeoutMs > 0 ? started + config.requestTimeoutMs : Infinity;
    budget.recordRequest(clock.now());

    for (let n = 1; ; n++) {
      record.attempts = n;
      const remaining = deadline - clock.now();
      const limit = Math.min(config.tryTimeoutMs > 0 ? config.tryTimeoutMs : Infinity, remaining);
      const tryStarted = clock.now();
      let res: Reply | undefined;
      let failure: FailureKind | undefined;
      let error = '';
      try {
        res = await attempt(target, { method, headers, body: body.take() }, limit, gone, body.sent);
        record.upstreamMs = clock.now() - tryStarted;
        events.attemptResponded({ id, attempt: n, status: res.status, seconds: record.upstreamMs / 1000 });
      } catch (err) {
        if (gone.aborted) throw err;
        failure = classifyFailure(err);
        error = failure === 'timeout' ? `timeout: ${describeFailure(err)}` : describeFailure(err);
      }
      record.bytesIn = body.bytes();
      const outcome: AttemptOutcome = res ? { status: res.status } : { failure: failure! };
      if (res && !RETRYABLE_STATUS.has(res.status)) return reply(res, method, id);

      const now = clock.now();
      const next = decideRetry({
        outcome, method, idempotencyKey, attempt: n, maxAttempts: config.retryAttempts,
        bodyReplayable: body.replayable, budgetAvailable: budget.canRetry(now),
        retryAfterMs: res ? parseRetryAfter(headerValue(res.headers, 'retry-after'), Date.now()) : undefined,
        backoffMs: backoffDelay(n, config.retryBackoffMs, config.retryBackoffMaxMs, clock.random()),
        remainingMs: deadline - now,
      });
      events.attemptFailed({ id, attempt: n, error: res ? `upstream answered ${res.status}` : error,
        kind: res ? 'status' : failure!, status: res?.status, next });
      if (!next.retry) {
        if (res) return reply(res, method, id); // the upstream's own last answer says more than ours would
        record.error = error;
        return failureReply(failure!, error, n, id);
      }
      budget.recordRetry(now);
      if (res) discard(res); // frees the connection for the next attempt
      await sleep(next.delayMs, gone);
      if (gone.aborted) throw gone.reason;
    }
  }

  function reply(res: Reply, method: string, id: string): Reply {
    const noBody = method === 'HEAD' || NULL_BODY_STATUS.has(res.status);
    if (noBody) discard(res);
    return { status: res.status, statusText: res.statusText, headers: responseHeaders(res.headers, id),
      body: noBody ? null : res.body, node: noBody ? undefined : res.node };
  }

  const proxy = new Hono<{ Bindings: Bindings }>();
  proxy.all('*', handle);
  proxy.onError((err, c) => {
    log('error', `unexpected error: ${describeFailure(err)}`, { path: c.req.path });
    return c.text('ambassador: internal error\n', 500);
  });

  const admin = new Hono<{ Bindings: Bindings }>();
  admin.get('/healthz', (c) => c.text('ok\n'));
  admin.get('/readyz', (c) => (ready && !draining ? c.text('ready\n') : c.text(draining ? 'draining\n' : 'starting\n', 503)));
  metrics.gauges = { ...metrics.gauges, inFlight: () => inFlight.size, draining: () => draining };
  admin.get('/metrics', (c) => {
    const openMetrics = (c.req.header('accept') ?? '').includes('application/openmetrics-text');
    return c.body(metrics.render(openMetrics), 200, {
      'content-type': openMetrics ? 'application/openmetrics-text; version=1.0.0; charset=utf-8' : 'text/plain; version=0.0.4; charset=utf-8',
    });
  });
  // A Job's main container, on a cluster without native sidecars, ends its pod by asking the sidecar to
  // drain. Only from inside the pod: the admin port is reachable from outside for the kubelet's probes.
  const shutdown = { requested: () => {} };
  admin.post('/shutdown', (c) => {
    const peer = clientAddress(c) ?? '';
    if (!/^(127\.|::1$|::ffff:127\.)/.test(peer)) return c.text('ambassador: /shutdown is for loopback clients only\n', 403);
    shutdown.requested();
    return c.text('draining\n', 202);
  });

  return {
    proxy,
    admin,
    inFlight,
    metrics,
    markReady: () => void (ready = true),
    startDrain: () => void (draining = true),
    onShutdownRequest: (f) => void (shutdown.requested = f),
    get draining() {
      return draining;
    },
  };
}

/** Requests the ambassador answers itself rather than forward: it only ever talks to UPSTREAM_URL. */
function refusal(method: string, rawTarget: string | undefined, url: URL, host: string | null): { status: number; reason: string; headers?: Record<string, string> } | undefined {
  if (REFUSED_METHODS.has(method)) {
    return { status: 405, reason: `method ${method} is not forwarded`, headers: { allow: 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS' } };
  }
  // An absolute-form target (`GET http://other-host/ HTTP/1.1`) asks for a forward proxy. Node hands us
  // the raw target; elsewhere the URL's authority differs from the Host header.
  const absolute = rawTarget !== undefined ? !rawTarget.startsWith('/') && rawTarget !== '*' : url.host !== host;
  if (absolute) return { status: 400, reason: 'absolute-form request targets are refused: this is not a forward proxy' };
  return undefined;
}

/** The app's request headers: from Node's raw list when there is one (no `Headers` object is built). */
function headerList(c: Context<{ Bindings: Bindings }>): HeaderList {
  const raw = c.env?.incoming?.rawHeaders;
  if (!raw) return [...c.req.raw.headers];
  const list: HeaderList = [];
  for (let i = 0; i < raw.length; i += 2) list.push([raw[i].toLowerCase(), raw[i + 1]]);
  return list;
}

function requestBody(c: Context<{ Bindings: Bindings }>): ReadableStream<Uint8Array> | null {
  const req = c.req.raw;
  if (req.method === 'GET' || req.method === 'HEAD') return null;
  const incoming = c.env?.incoming;
  return incoming && Symbol.asyncIterator in incoming ? streamFromNode(incoming as AsyncIterable<Uint8Array>) : req.body;
}

function clientAddress(c: Context<{ Bindings: Bindings }>): string | undefined {
  return c.env?.incoming?.socket?.remoteAddress ?? c.env?.remoteAddr;
}

// ---------------------------------------------------------------------------------------------------------
// Runtime adapters: listen, stop accepting, cut off — on Node (@hono/node-server) and on Deno (Deno.serve).
// ---------------------------------------------------------------------------------------------------------

interface Listener {
  port: number;
  /** Stops accepting and resolves once every connection has ended. */
  close(): Promise<void>;
  /** Ends every connection now. */
  cutOff(): void;
  /** Open connections, where the runtime tells. */
  connections?(): number;
}

type FetchHandler = (req: Request, env: Bindings) => Response | Promise<Response>;

interface DenoLike {
  serve(options: {
    hostname: string; port: number; signal: AbortSignal; onListen?: (addr: unknown) => void;
    handler: (req: Request, info: { remoteAddr: { hostname: string } }) => Response | Promise<Response>;
  }): { addr: { port: number }; shutdown(): Promise<void>; finished: Promise<void> };
  addSignalListener(signal: string, handler: () => void): void;
  env: { toObject(): Record<string, string> };
  exit(code: number): never;
  mainModule: string;
}

const deno = (globalThis as { Deno?: DenoLike }).Deno;

type NodeHttp = Pick<typeof import('node:http'), 'request' | 'Agent'>;

/** Node's upstream client: `node:http` with a keep-alive pool. Node 20's fetch holds on to every chunk of
 * a streamed request body (a 1 GiB upload took 1.1 GiB of memory) and is several times slower than a
 * pooled http.request; this gives the handler the same `Response` fetch would, byte for byte. */
function nodeSend(http: NodeHttp, https: NodeHttp): Send {
  // `timeout` closes pooled sockets idle for 4 s, before a Node upstream's own 5 s keep-alive timeout
  // closes them under a request that is reusing them.
  const pool = { keepAlive: true, maxSockets: Infinity, maxFreeSockets: 256, scheduling: 'lifo' as const, timeout: 4000 };
  const agents = { 'http:': new http.Agent(pool), 'https:': new https.Agent(pool) };
  return (url, init) => new Promise<Reply>((resolve, reject) => {
    const target = new URL(url);
    // A flat list keeps the app's header order and repeats; Node then adds no Host of its own.
    const headers = ['host', target.host, ...(init.body instanceof Uint8Array
      ? [...init.headers.filter(([name]) => name !== 'content-length'), ['content-length', String(init.body.byteLength)]].flat()
      : init.headers.flat())];
    const client = target.protocol === 'https:' ? https : http;
    const req = client.request(target, {
      method: init.method, headers, agent: agents[target.protocol as 'http:' | 'https:'], signal: init.signal,
    });
    req.on('error', reject);
    req.on('response', (res) => {
      const status = res.statusCode ?? 502;
      const headers: HeaderList = [];
      for (let i = 0; i < res.rawHeaders.length; i += 2) headers.push([res.rawHeaders[i].toLowerCase(), res.rawHeaders[i + 1]]);
      const noBody = init.method === 'HEAD' || NULL_BODY_STATUS.has(status);
      if (noBody) res.resume();
      resolve({ status, statusText: res.statusMessage ?? '', headers, body: null, node: noBody ? undefined : res as unknown as NodeReadable });
    });
    const body = init.body;
    if (body === null) req.end();
    else if (body instanceof Uint8Array) req.end(body);
    else void (async () => {
      const reader = body.getReader();
      try {
        for (let next = await reader.read(); !next.done; next = await reader.read()) {
          if (!req.write(next.value)) await new Promise((r) => req.once('drain', r));
        }
        req.end();
      } catch (err) {
        req.destroy(err as Error);
      }
    })();
  });
}

async function listenNode(fetchHandler: FetchHandler, host: string, port: number): Promise<Listener> {
  const { createAdaptorServer } = await import('@hono/node-server');
  const server = createAdaptorServer({ fetch: fetchHandler as never, hostname: host }) as import('node:http').Server;
  // Longer than the idle timeouts of common clients (Go keeps idle connections 90 s, Node's agents
  // less), so the app is not the one reusing a connection the ambassador is closing.
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  server.requestTimeout = 0; // a large upload may take longer than Node's default 5 minutes
  // Node does not route CONNECT to the request handler; answer it rather than drop the socket.
  server.on('connect', (_req: unknown, socket: { end(data: string): void }) => {
    socket.end('HTTP/1.1 405 Method Not Allowed\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
  });
  let open = 0;
  server.on('connection', (socket: { once(event: 'close', f: () => void): void }) => {
    open++;
    socket.once('close', () => open--);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const address = server.address();
  return {
    port: typeof address === 'object' && address ? address.port : port,
    close: () => new Promise<void>((resolve) => {
      // A connection turns idle only after its last response, so closing idle ones once is not enough.
      const sweep = setInterval(() => server.closeIdleConnections(), 50);
      server.close(() => {
        clearInterval(sweep);
        resolve();
      });
      server.closeIdleConnections();
    }),
    cutOff: () => server.closeAllConnections(),
    connections: () => open,
  };
}

function listenDeno(d: DenoLike, fetchHandler: FetchHandler, host: string, port: number): Listener {
  const abort = new AbortController();
  const server = d.serve({
    hostname: host, port, signal: abort.signal, onListen: () => {},
    handler: (req, info) => fetchHandler(req, { remoteAddr: info.remoteAddr.hostname }),
  });
  let closing = false;
  return {
    port: server.addr.port,
    close: () => {
      closing = true;
      return server.shutdown();
    },
    // Aborting a server that is shutting down throws inside Deno; the exit that follows closes its sockets.
    cutOff: () => closing || abort.abort(),
  };
}

function listen(fetchHandler: FetchHandler, host: string, port: number): Promise<Listener> {
  return deno ? Promise.resolve(listenDeno(deno, fetchHandler, host, port)) : listenNode(fetchHandler, host, port);
}

function exit(code: number): never {
  if (deno) return deno.exit(code);
  return process.exit(code);
}

function onSignals(handler: (signal: string) => void): void {
  for (const signal of ['SIGTERM', 'SIGINT']) {
    if (deno) deno.addSignalListener(signal, () => handler(signal));
    else process.on(signal, () => handler(signal));
  }
}

// ---------------------------------------------------------------------------------------------------------
// main: configure, listen, drain on SIGTERM.
// ---------------------------------------------------------------------------------------------------------

export async function main(env: Record<string, string | undefined>): Promise<void> {
  let config: Config;
  try {
    config = loadConfig(env);
  } catch (err) {
    console.error(`ambassador: ${err instanceof Error ? err.message : String(err)}`);
    return exit(2);
  }
  const log = createLogger(config.logFormat, config.logLevel);
  const amb = createAmbassador(config, {
    log,
    ...(deno ? {} : {
      send: nodeSend(await import('node:http'), await import('node:https') as unknown as NodeHttp),
      written: (await import('@hono/node-server/utils/response')).RESPONSE_ALREADY_SENT,
    }),
  });

  let proxy: Listener;
  let admin: Listener;
  try {
    proxy = await listen(amb.proxy.fetch as FetchHandler, config.host, config.port);
    admin = await listen(amb.admin.fetch as FetchHandler, config.adminHost, config.adminPort);
  } catch (err) {
    log('error', `cannot listen: ${describeFailure(err)}`, { host: config.host, port: config.port,
      admin_host: config.adminHost, admin_port: config.adminPort });
    return exit(1);
  }
  onSignals((signal) => {
    if (amb.draining) {
      log('warn', `second ${signal}: exiting now`, { in_flight: amb.inFlight.size });
      return exit(1);
    }
    void drain(signal, config, amb, proxy, admin, log);
  });
  amb.onShutdownRequest(() => amb.draining || void drain('POST /shutdown', config, amb, proxy, admin, log));
  amb.metrics.gauges = { ...amb.metrics.gauges, connections: proxy.connections };
  sampleEventLoopLag(amb.metrics);
  amb.markReady();
  log('notice', 'listening', {
    version: VERSION, runtime: deno ? 'deno' : 'node', port: proxy.port, admin_port: admin.port,
    config: { ...config, upstream: config.upstream.href },
  });
}

/** How late a 500 ms timer fires tells how busy the event loop is; a proxy that lags adds that to
 * every request. */
function sampleEventLoopLag(metrics: Metrics): void {
  let expected = performance.now() + 500;
  setInterval(() => {
    const now = performance.now();
    metrics.eventLoopLagSeconds = Math.max(0, now - expected) / 1000;
    expected = now + 500;
  }, 500);
}

/** The drain, as Kubernetes needs it: not ready at once; still serving for DRAIN_GRACE_MS (an app that
 * is itself draining may still call out); then no new connections, busy ones closed after their
 * response, idle ones closed again and again; exit 0 once nothing is left, or at DRAIN_TIMEOUT_MS. */
async function drain(signal: string, config: Config, amb: Ambassador, proxy: Listener, admin: Listener, log: Logger) {
  amb.startDrain();
  log('notice', `${signal}: drain started, /readyz now answers 503`, {
    in_flight: amb.inFlight.size, grace_ms: config.drainGraceMs, timeout_ms: config.drainTimeoutMs,
  });
  let timedOut = false;
  const deadline = new Promise<void>((resolve) => setTimeout(() => {
    timedOut = true;
    resolve();
  }, config.drainTimeoutMs));
  if (config.drainGraceMs > 0) {
    await Promise.race([new Promise((r) => setTimeout(r, Math.min(config.drainGraceMs, config.drainTimeoutMs))), deadline]);
  }
  log('notice', 'drain: no longer accepting connections', { in_flight: amb.inFlight.size });
  await Promise.race([proxy.close(), deadline]);
  if (timedOut) {
    const cut = [...amb.inFlight].map(([id, r]) => ({ id, method: r.method, path: r.path }));
    log('warn', `drain: timed out after ${config.drainTimeoutMs} ms, cutting off ${cut.length} request(s)`, { cut_off: cut });
    proxy.cutOff();
  }
  admin.cutOff();
  log('notice', 'drain complete, exiting', { exit_code: 0 });
  exit(0);
}

// ---------------------------------------------------------------------------------------------------------
// Entry: run main() only when this file is the program, not when a test imports it.
// ---------------------------------------------------------------------------------------------------------

function isEntry(): boolean {
  if (deno) return (import.meta as { main?: boolean }).main === true;
  // A CommonJS bundle (the one a Node single executable is made from) has no import.meta: it is only
  // ever built to be the program.
  if (import.meta.url === undefined) return true;
  const script = process.argv[1];
  return script !== undefined && decodeURIComponent(new URL(import.meta.url).pathname) === script;
}

if (isEntry()) void main(deno ? deno.env.toObject() : process.env);
