/** Property-based tests (fast-check) over the config parser and the header rules: whatever comes in,
 * the result keeps its promises. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ConfigError, forwardHeaders, loadConfig, responseHeaders, stripHopByHop, type HeaderList } from '../ambassador.ts';

const NAMES = ['UPSTREAM_URL', 'HOST', 'PORT', 'ADMIN_HOST', 'ADMIN_PORT', 'RETRY_ATTEMPTS', 'RETRY_BACKOFF_MS', 'RETRY_BACKOFF_MAX_MS',
  'RETRY_BUDGET_PERCENT', 'RETRY_BUDGET_MIN_PER_SEC', 'RETRY_BODY_MAX_BYTES', 'TRY_TIMEOUT_MS', 'REQUEST_TIMEOUT_MS', 'DRAIN_TIMEOUT_MS',
  'DRAIN_GRACE_MS', 'BODY_IDLE_TIMEOUT_MS', 'LOG_FORMAT', 'LOG_LEVEL', 'BREAKER_FAILURES', 'BREAKER_OPEN_MS', 'BREAKER_OPEN_MAX_MS',
  'BREAKER_PROBES', 'MAX_IN_FLIGHT', 'QUEUE_SIZE', 'QUEUE_TIMEOUT_MS', 'RATE_LIMIT_PER_SEC', 'RATE_LIMIT_BURST', 'RATE_LIMIT_WAIT_MS', 'DNS_REFRESH_MS'];
const HOP = ['connection', 'keep-alive', 'proxy-connection', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer', 'transfer-encoding', 'upgrade'];

const value = fc.oneof(fc.string(), fc.integer({ min: -10, max: 100_000 }).map(String), fc.constantFrom('', ' ', 'json', 'text', 'debug', 'http://h:1', 'https://x/y', '1e3', '0x10', 'NaN'));
const env = fc.dictionary(fc.constantFrom(...NAMES), value);

describe('loadConfig under arbitrary environments', () => {
  it('returns a frozen, valid config or throws one ConfigError naming each bad variable', () => {
    fc.assert(fc.property(env, (e) => {
      try {
        const c = loadConfig(e);
        expect(Object.isFrozen(c)).toBe(true);
        const [r] = c.routes;
        for (const u of r.upstreams) expect(['http:', 'https:']).toContain(u.protocol);
        expect(r.retryAttempts).toBeGreaterThanOrEqual(1);
        for (const n of [c.port, c.adminPort]) expect(n >= 0 && n <= 65535).toBe(true);
        for (const n of [r.tryTimeoutMs, r.requestTimeoutMs, c.drainTimeoutMs, r.retryBodyMaxBytes, r.maxInFlight, r.queueSize]) expect(Number.isSafeInteger(n) && n >= 0).toBe(true);
        expect(r.retryBackoffMaxMs).toBeGreaterThanOrEqual(r.retryBackoffMs);
        expect(r.breakerOpenMaxMs).toBeGreaterThanOrEqual(r.breakerOpenMs);
        if (r.rateLimitPerSec > 0) expect(r.rateLimitBurst).toBeGreaterThan(0);
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        for (const problem of (err as ConfigError).problems) expect(NAMES.some((n) => problem.startsWith(n))).toBe(true);
      }
    }), { numRuns: 2000 });
  });
});

describe('loadConfig under arbitrary routes files', () => {
  const field = fc.constantFrom('name', 'prefix', 'host', 'upstream', 'stripPrefix', 'tls', 'retryAttempts', 'maxInFlight', 'rateLimitPerSec', 'breakerOpenMs', 'typo');
  const json = fc.oneof(fc.string(), fc.integer({ min: -5, max: 200 }), fc.boolean(), fc.constant(null),
    fc.constantFrom('/', '/inventory', '/a/b/', 'inventory', 'http://h:1', 'https://x', ['http://a', 'http://b'], { caFile: '/nope' }, 'ftp://x'));
  const route = fc.dictionary(field, json);
  const doc = fc.oneof(fc.record({ routes: fc.array(route, { maxLength: 5 }) }), json, fc.array(route));

  it('returns routes that keep their promises, or throws one ConfigError whose every problem names ROUTES_FILE and a field', () => {
    fc.assert(fc.property(doc, (d) => {
      const text = JSON.stringify(d) ?? 'null';
      try {
        const c = loadConfig({ ROUTES_FILE: '/routes.json' }, () => text);
        expect(c.routes.length).toBeGreaterThan(0);
        for (const r of c.routes) {
          expect(r.prefix.startsWith('/')).toBe(true);
          expect(r.upstreams.length).toBeGreaterThan(0);
          expect(r.retryAttempts).toBeGreaterThanOrEqual(1);
        }
        // Most specific first: no route is hidden behind an earlier one that covers it.
        c.routes.forEach((r, i) => c.routes.slice(0, i).forEach((earlier) => {
          if (earlier.host === r.host) expect(earlier.prefix.length).toBeGreaterThanOrEqual(r.prefix.length);
        }));
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        for (const problem of (err as ConfigError).problems) expect(problem.startsWith('ROUTES_FILE="/routes.json"')).toBe(true);
      }
    }), { numRuns: 2000 });
  });
});

const token = fc.stringMatching(/^[a-z][a-z0-9-]{0,15}$/);
const headerName = fc.oneof(token, fc.constantFrom(...HOP, 'host', 'expect', 'via', 'x-request-id', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'accept-encoding'));
const headerValueArb = fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?$/);
const list = fc.array(fc.tuple(headerName, headerValueArb), { maxLength: 20 });
// Up to two Connection headers, naming headers in any case.
const connectionList = fc.tuple(list, fc.array(fc.array(token.map((t) => (t.length % 2 ? t.toUpperCase() : t)), { minLength: 1, maxLength: 3 }), { maxLength: 2 }))
  .map(([l, groups]): HeaderList => [...l, ...groups.map((g): [string, string] => ['connection', g.join(', ')])]);

describe('header rules under arbitrary header lists', () => {
  it('never forwards a hop-by-hop header or one that Connection names', () => {
    fc.assert(fc.property(connectionList, fc.uuid(), (headers, id) => {
      const named = headers.filter(([k]) => k === 'connection').flatMap(([, v]) => v.split(',').map((n) => n.trim().toLowerCase()));
      for (const out of [forwardHeaders(headers, id, '127.0.0.1'), responseHeaders(headers, id), stripHopByHop(headers)]) {
        for (const [name] of out) {
          expect(HOP).not.toContain(name);
          expect(named).not.toContain(name);
        }
      }
    }), { numRuns: 2000 });
  });

  it('gives the upstream exactly one request id, one Via ending in ours, identity encoding, and no Host or Expect', () => {
    fc.assert(fc.property(list, fc.uuid(), (headers, id) => {
      const out = forwardHeaders(headers, id, '127.0.0.1');
      const all = (n: string) => out.filter(([k]) => k === n);
      expect(all('x-request-id')).toEqual([['x-request-id', id]]);
      expect(all('via')).toHaveLength(1);
      expect(all('via')[0][1].endsWith('1.1 ambassador')).toBe(true);
      expect(all('accept-encoding')).toEqual([['accept-encoding', 'identity']]);
      expect(all('host')).toHaveLength(0);
      expect(all('expect')).toHaveLength(0);
      expect(all('x-forwarded-for')).toHaveLength(1);
      expect(all('x-forwarded-for')[0][1].endsWith('127.0.0.1')).toBe(true);
    }), { numRuns: 2000 });
  });

  it('keeps every other header, in order, with its value untouched', () => {
    const special = new Set([...HOP, 'host', 'expect', 'via', 'x-request-id', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'accept-encoding']);
    fc.assert(fc.property(list, (headers) => {
      // Headers that a Connection header names are hop-by-hop too (any case): dropped, rightly.
      const named = new Set(headers.filter(([k]) => k === 'connection').flatMap(([, v]) => v.split(',').map((n) => n.trim().toLowerCase())));
      const plain = headers.filter(([k]) => !special.has(k) && !named.has(k));
      const out = forwardHeaders(headers, 'id', undefined).filter(([k]) => !special.has(k));
      expect(out).toEqual(plain);
    }), { numRuns: 2000 });
  });
});
