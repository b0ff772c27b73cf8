/** Property-based tests (fast-check) over the config parser and the header rules: whatever comes in,
 * the result keeps its promises. */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  ConfigError,
  forwardHeaders,
  type HeaderList,
  loadConfig,
  matchRoute,
  responseHeaders,
  stripHopByHop,
} from '../../ambassador.ts';

const NAMES = [
  'UPSTREAM_URL',
  'HOST',
  'PORT',
  'ADMIN_HOST',
  'ADMIN_PORT',
  'RETRY_ATTEMPTS',
  'RETRY_BACKOFF_MS',
  'RETRY_BACKOFF_MAX_MS',
  'RETRY_BUDGET_PERCENT',
  'RETRY_BUDGET_MIN_PER_SEC',
  'RETRY_BODY_MAX_BYTES',
  'TRY_TIMEOUT_MS',
  'REQUEST_TIMEOUT_MS',
  'DRAIN_TIMEOUT_MS',
  'DRAIN_GRACE_MS',
  'BODY_IDLE_TIMEOUT_MS',
  'LOG_FORMAT',
  'LOG_LEVEL',
  'BREAKER_FAILURES',
  'BREAKER_OPEN_MS',
  'BREAKER_OPEN_MAX_MS',
  'BREAKER_PROBES',
  'MAX_IN_FLIGHT',
  'QUEUE_SIZE',
  'QUEUE_TIMEOUT_MS',
  'RATE_LIMIT_PER_SEC',
  'RATE_LIMIT_BURST',
  'RATE_LIMIT_WAIT_MS',
  'DNS_REFRESH_MS',
  'CPU_LIMIT_MILLICORES',
  'QUEUE_NEWEST_FIRST_MS',
  'SCHED_POLICY',
];
const HOP = [
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

/** A valid environment: every numeric setting in range (cross-field rules kept), a valid URL and hosts. */
const validEnv = fc.record({
  UPSTREAM_URL: fc.constantFrom(
    'http://inventory:9000',
    'https://payments.internal:8443/api',
    'http://10.0.0.7:80,http://10.0.0.8:80',
    'http://h/base/',
  ),
  HOST: fc.constantFrom('127.0.0.1', '::1', '0.0.0.0', 'localhost'),
  PORT: fc.integer({ min: 1, max: 30000 }).map(String),
  ADMIN_PORT: fc.integer({ min: 30001, max: 65535 }).map(String),
  RETRY_ATTEMPTS: fc.integer({ min: 1, max: 100 }).map(String),
  RETRY_BACKOFF_MS: fc.integer({ min: 0, max: 1000 }).map(String),
  RETRY_BUDGET_PERCENT: fc.integer({ min: 0, max: 100 }).map(String),
  TRY_TIMEOUT_MS: fc.integer({ min: 0, max: 60000 }).map(String),
  REQUEST_TIMEOUT_MS: fc.integer({ min: 0, max: 60000 }).map(String),
  BREAKER_OPEN_MS: fc.integer({ min: 1, max: 5000 }).map(String),
  MAX_IN_FLIGHT: fc.integer({ min: 0, max: 5000 }).map(String),
  RATE_LIMIT_PER_SEC: fc.integer({ min: 0, max: 1000 }).map(String),
  LOG_FORMAT: fc.constantFrom('json', 'text', 'JSON'),
  LOG_LEVEL: fc.constantFrom('debug', 'info', 'warn', 'error'),
  SCHED_POLICY: fc.constantFrom('normal', 'batch', 'BATCH'),
}, { requiredKeys: ['UPSTREAM_URL'] }).map((e): Record<string, string> => ({
  ...e,
  // The caps at least their bases, as the rules require.
  ...(e.RETRY_BACKOFF_MS ? { RETRY_BACKOFF_MAX_MS: String(Number(e.RETRY_BACKOFF_MS) + 100) } : {}),
  ...(e.BREAKER_OPEN_MS ? { BREAKER_OPEN_MAX_MS: String(Number(e.BREAKER_OPEN_MS) * 4) } : {}),
}));
/** Values each variable must refuse. */
const BAD: Record<string, string[]> = {
  UPSTREAM_URL: ['ftp://x', 'http://h:0', 'http://u:p@h', 'http://h/?', 'not a url', 'http://h#x'],
  HOST: ['not-an-ip', '999.1.1.1', '127.0.0.1:80'],
  ADMIN_HOST: ['example.com'],
  PORT: ['-1', '65536', 'abc', '80.5'],
  ADMIN_PORT: ['x'],
  RETRY_ATTEMPTS: ['0', '101', 'three'],
  RETRY_BACKOFF_MS: ['-5', '1e3'],
  RETRY_BUDGET_PERCENT: ['101'],
  TRY_TIMEOUT_MS: ['0x10', 'NaN'],
  BREAKER_OPEN_MS: ['0'],
  MAX_IN_FLIGHT: ['-1'],
  LOG_FORMAT: ['yaml'],
  LOG_LEVEL: ['verbose'],
  DRAIN_TIMEOUT_MS: ['soon'],
  CPU_LIMIT_MILLICORES: ['-100', '0.5', '100m'],
  QUEUE_NEWEST_FIRST_MS: ['-1', '1s'],
  SCHED_POLICY: ['idle', 'fifo', 'batch,normal'],
};
const mutations = fc.uniqueArray(fc.constantFrom(...Object.keys(BAD)), { maxLength: 3 })
  .chain((names) => fc.tuple(fc.constant(names), fc.tuple(...names.map((n) => fc.constantFrom(...BAD[n])))));

describe('loadConfig under mostly valid environments with targeted mutations', () => {
  it('returns a frozen, valid config or throws one ConfigError naming each mutated variable, and both branches run often', () => {
    let valid = 0;
    let refused = 0;
    fc.assert(
      fc.property(
        validEnv,
        fc.oneof({ weight: 2, arbitrary: fc.constant([[], []] as [string[], string[]]) }, {
          weight: 3,
          arbitrary: mutations,
        }),
        (base, [names, values]) => {
          const e = { ...base };
          names.forEach((n, i) => (e[n] = values[i]));
          try {
            const c = loadConfig(e);
            valid++;
            expect(names).toEqual([]); // every mutation is refused
            expect(Object.isFrozen(c)).toBe(true);
            const [r] = c.routes;
            for (const u of r.upstreams) expect(['http:', 'https:']).toContain(u.protocol);
            expect(r.retryAttempts).toBeGreaterThanOrEqual(1);
            for (const n of [c.port, c.adminPort]) expect(n >= 0 && n <= 65535).toBe(true);
            for (
              const n of [
                r.tryTimeoutMs,
                r.requestTimeoutMs,
                c.drainTimeoutMs,
                r.retryBodyMaxBytes,
                r.maxInFlight,
                r.queueSize,
              ]
            ) expect(Number.isSafeInteger(n) && n >= 0).toBe(true);
            expect(r.retryBackoffMaxMs).toBeGreaterThanOrEqual(r.retryBackoffMs);
            expect(r.breakerOpenMaxMs).toBeGreaterThanOrEqual(r.breakerOpenMs);
            if (r.rateLimitPerSec > 0) expect(r.rateLimitBurst).toBeGreaterThan(0);
          } catch (err) {
            refused++;
            expect(err).toBeInstanceOf(ConfigError);
            const problems = (err as ConfigError).problems;
            for (const n of names) expect(problems.some((p) => p.startsWith(`${n}=`)), `${n}=${e[n]}`).toBe(true);
            for (const problem of problems) expect(NAMES.some((n) => problem.startsWith(n))).toBe(true);
          }
        },
      ),
      { numRuns: 2000 },
    );
    expect(valid).toBeGreaterThan(400);
    expect(refused).toBeGreaterThan(400);
  });
});

describe('loadConfig under mostly valid routes files with targeted mutations', () => {
  const segment = fc.constantFrom('inventory', 'payments', 'v1', 'items', 'a', 'b%2Fc', 'x.y');
  const route = (i: number) =>
    fc.record({
      prefix: fc.array(segment, { minLength: 0, maxLength: 3 }).map((parts) =>
        `/r${i}${parts.map((p) => `/${p}`).join('')}`
      ),
      host: fc.option(fc.constantFrom('shop.local', 'api.internal'), { nil: undefined }),
      upstream: fc.oneof(
        fc.constantFrom('http://h:9000', 'https://p.internal:8443/base'),
        fc.constant(['http://a:1', 'http://b:2']),
      ),
      stripPrefix: fc.option(fc.boolean(), { nil: undefined }),
      retryAttempts: fc.option(fc.integer({ min: 1, max: 100 }), { nil: undefined }),
      maxInFlight: fc.option(fc.integer({ min: 0, max: 10000 }), { nil: undefined }),
    }).map((r) => Object.fromEntries(Object.entries({ name: `route-${i}`, ...r }).filter(([, v]) => v !== undefined)));
  // Routes that nest: a short prefix of one may cover another's longer one, so order matters.
  const routes = fc.integer({ min: 1, max: 6 }).chain((n) =>
    fc.tuple(...Array.from({ length: n }, (_, i) => route(i % 3)))
  )
    .map((list) =>
      list.map((r, i) => ({ ...r, name: `route-${i}`, prefix: i >= 3 ? `${r.prefix}/deeper${i}` : r.prefix }))
    );
  const BAD_FIELDS: Record<string, unknown[]> = {
    name: ['bad one', '', 7],
    prefix: ['inventory', '/a/../b', '/a b', '/%zz', 5],
    host: ['a b', 'h:80'],
    upstream: ['ftp://x', [], 'http://h:0', 'http://h?'],
    stripPrefix: ['yes'],
    retryAttempts: [0, 101, '3'],
    maxInFlight: [-1, 1.5],
    typo: [1],
    tls: ['x', { pinned: true }],
  };
  const mutation = fc.tuple(fc.nat(), fc.constantFrom(...Object.keys(BAD_FIELDS)), fc.nat());

  it('gives routes where each is reached by its own prefix, or one ConfigError naming ROUTES_FILE and each mutated field, and both branches run often', () => {
    let valid = 0;
    let refused = 0;
    fc.assert(
      fc.property(
        routes,
        fc.oneof({ weight: 2, arbitrary: fc.constant([] as Array<[number, string, number]>) }, {
          weight: 3,
          arbitrary: fc.array(mutation, { minLength: 1, maxLength: 2 }),
        }),
        (list, muts) => {
          const doc = { routes: list.map((r) => ({ ...r })) as Array<Record<string, unknown>> };
          const mutated: string[] = [];
          for (const [at, field, pick] of muts) {
            const i = at % doc.routes.length;
            doc.routes[i][field] = BAD_FIELDS[field][pick % BAD_FIELDS[field].length];
            mutated.push(`routes[${i}].${field}`);
          }
          const text = JSON.stringify(doc);
          try {
            const c = loadConfig({ ROUTES_FILE: '/routes.json' }, () => text);
            valid++;
            expect(mutated).toEqual([]);
            expect(c.routes).toHaveLength(list.length);
            // Most specific first, and so every route is what its own prefix (and host) reaches.
            c.routes.forEach((r, i) =>
              c.routes.slice(0, i).forEach((earlier) => {
                if (earlier.host === r.host) expect(earlier.prefix.length).toBeGreaterThanOrEqual(r.prefix.length);
              })
            );
            for (const r of c.routes) {
              expect(matchRoute(c.routes, r.host, r.prefix)?.name).toBe(r.name);
            }
          } catch (err) {
            refused++;
            expect(err).toBeInstanceOf(ConfigError);
            const problems = (err as ConfigError).problems;
            for (const m of mutated) {
              expect(problems.some((p) => p.includes(`: ${m}`)), `${m}\n${problems.join('\n')}`)
                .toBe(true);
            }
            for (const problem of problems) expect(problem.startsWith('ROUTES_FILE="/routes.json"')).toBe(true);
          }
        },
      ),
      { numRuns: 2000 },
    );
    expect(valid).toBeGreaterThan(400);
    expect(refused).toBeGreaterThan(400);
  });

  it('throws one ConfigError naming ROUTES_FILE for documents that are not routes at all', () => {
    const junk = fc.oneof(
      fc.string(),
      fc.integer(),
      fc.constant(null),
      fc.array(fc.anything()),
      fc.record({ routes: fc.oneof(fc.constant([]), fc.string(), fc.integer()) }),
    );
    fc.assert(
      fc.property(junk, (d) => {
        expect(() => loadConfig({ ROUTES_FILE: '/routes.json' }, () => JSON.stringify(d) ?? 'null')).toThrow(
          ConfigError,
        );
      }),
      { numRuns: 500 },
    );
  });
});

const token = fc.stringMatching(/^[a-z][a-z0-9-]{0,15}$/);
/** The header names the forwarding rules treat specially: hop-by-hop ones, and those replaced or added. */
const SPECIAL = [
  ...HOP,
  'host',
  'expect',
  'via',
  'x-request-id',
  'x-forwarded-for',
  'x-forwarded-proto',
  'x-forwarded-host',
  'accept-encoding',
];
const headerName = fc.oneof(
  token,
  fc.constantFrom(...SPECIAL),
);
const headerValueArb = fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?$/);
const list = fc.array(fc.tuple(headerName, headerValueArb), { maxLength: 20 });
// Up to two Connection headers, naming headers in any case.
const connectionList = fc.tuple(
  list,
  fc.array(fc.array(token.map((t) => (t.length % 2 ? t.toUpperCase() : t)), { minLength: 1, maxLength: 3 }), {
    maxLength: 2,
  }),
)
  .map(([l, groups]): HeaderList => [...l, ...groups.map((g): [string, string] => ['connection', g.join(', ')])]);

describe('header rules under arbitrary header lists', () => {
  it('never forwards a hop-by-hop header or one that Connection names', () => {
    fc.assert(
      fc.property(connectionList, fc.uuid(), (headers, id) => {
        const named = headers.filter(([k]) => k === 'connection').flatMap(([, v]) =>
          v.split(',').map((n) => n.trim().toLowerCase())
        );
        for (
          const out of [forwardHeaders(headers, id, '127.0.0.1'), responseHeaders(headers, id), stripHopByHop(headers)]
        ) {
          for (const [name] of out) {
            expect(HOP).not.toContain(name);
            expect(named).not.toContain(name);
          }
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('gives the upstream exactly one request id, one Via ending in ours, identity encoding, and no Host or Expect', () => {
    fc.assert(
      fc.property(list, fc.uuid(), (headers, id) => {
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
      }),
      { numRuns: 2000 },
    );
  });

  it('keeps every other header, in order, with its value untouched', () => {
    const special = new Set(SPECIAL);
    fc.assert(
      fc.property(list, (headers) => {
        // Headers that a Connection header names are hop-by-hop too (any case): dropped, rightly.
        const named = new Set(
          headers.filter(([k]) => k === 'connection').flatMap(([, v]) =>
            v.split(',').map((n) => n.trim().toLowerCase())
          ),
        );
        const plain = headers.filter(([k]) => !special.has(k) && !named.has(k));
        const out = forwardHeaders(headers, 'id', undefined).filter(([k]) => !special.has(k));
        expect(out).toEqual(plain);
      }),
      { numRuns: 2000 },
    );
  });
});
