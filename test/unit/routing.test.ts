/** Routing several dependencies through one ambassador: routes from a JSON file (ROUTES_FILE), each a path
 * prefix and optionally a Host, with its own upstream and policy; a request no route takes gets 404. */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, matchRoute, normalizePath, stripPrefix } from '../../ambassador.ts';

const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-routes-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let files = 0;
/** Writes a routes file and returns its path. */
const routesFile = (doc: unknown) => {
  const file = path.join(dir, `routes-${files++}.json`);
  writeFileSync(file, typeof doc === 'string' ? doc : JSON.stringify(doc, null, 2));
  return file;
};
const read = (file: string) => readFileSync(file, 'utf8');

describe('matchRoute', () => {
  const routes = loadConfig({
    ROUTES_FILE: routesFile({
      routes: [
        { name: 'all', prefix: '/', upstream: 'http://a' },
        { name: 'inventory', prefix: '/inventory', upstream: 'http://b' },
        { name: 'inventory-v2', prefix: '/inventory/v2/', upstream: 'http://c' },
        { name: 'payments-host', host: 'payments.local', prefix: '/', upstream: 'http://d' },
      ],
    }),
  }, read).routes;
  const match = (host: string | null, p: string) => matchRoute(routes, host, p)?.name;

  it('takes the most specific route, whatever the order of the file', () => {
    expect(match('localhost:8080', '/inventory/v2/items')).toBe('inventory-v2');
    expect(match('localhost:8080', '/inventory/items')).toBe('inventory');
    expect(match('localhost:8080', '/other')).toBe('all');
  });

  it('matches a prefix only at a path-segment boundary', () => {
    expect(match('localhost', '/inventory')).toBe('inventory');
    expect(match('localhost', '/inventory-old/x')).toBe('all');
    expect(match('localhost', '/inventory/v2')).toBe('inventory-v2');
  });

  it("prefers a route for the request's Host, compared without port and case", () => {
    expect(match('Payments.Local:8080', '/inventory')).toBe('payments-host');
    expect(match(null, '/inventory')).toBe('inventory');
  });

  it('matches nothing when no route covers the path', () => {
    const only =
      loadConfig({ ROUTES_FILE: routesFile({ routes: [{ name: 'x', prefix: '/x', upstream: 'http://a' }] }) }, read)
        .routes;
    expect(matchRoute(only, 'h', '/y')).toBeUndefined();
  });
});

describe('stripPrefix', () => {
  it("takes the route's prefix off the normalized path, keeping the encoding", () => {
    expect(stripPrefix('/inventory/items/a%2Fb', '/inventory')).toBe('/items/a%2Fb');
    expect(stripPrefix('/inventory', '/inventory')).toBe('/');
    expect(stripPrefix('/inventory/', '/inventory')).toBe('/');
    expect(stripPrefix('/a/b', '/')).toBe('/a/b');
  });
});

describe('normalizePath', () => {
  it('resolves dot segments, plain or percent-encoded, never above the root (RFC 3986 §5.2.4)', () => {
    expect(normalizePath('/a/b/../c')).toBe('/a/c');
    expect(normalizePath('/../../internal/admin')).toBe('/internal/admin');
    expect(normalizePath('/%2e%2e/%2E%2E/internal')).toBe('/internal');
    expect(normalizePath('/a/.%2e/b')).toBe('/b');
    expect(normalizePath('/a/./b/.')).toBe('/a/b/');
    expect(normalizePath('/a/b/..')).toBe('/a/');
    expect(normalizePath('/s/../s/t')).toBe('/s/t');
    expect(normalizePath('/..')).toBe('/');
  });

  it('keeps every other byte as sent: encoded slashes, empty segments, dots inside names', () => {
    for (const p of ['/a%2Fb', '/group%2Fproject/files', '/a//b', '/v1.2/x..y/.z', '/%41b', '/']) {
      expect(normalizePath(p)).toBe(p);
    }
  });

  it('refuses dot segments behind encoded slashes or backslashes, and backslashes', () => {
    for (const p of ['/..%2f..%2finternal', '/a/..%2F', '/x%2F..%2Fy', '/%2e%2e%5cadmin', '/a\\..\\b', '/a\\b']) {
      expect(normalizePath(p), p).toBeNull();
    }
  });
});

describe('routes from ROUTES_FILE', () => {
  it("takes every setting per route, with the environment's values as the defaults", () => {
    const c = loadConfig({
      RETRY_ATTEMPTS: '4',
      TRY_TIMEOUT_MS: '700',
      ROUTES_FILE: routesFile({
        routes: [
          {
            name: 'inventory',
            prefix: '/inventory',
            upstream: ['http://i1:9000', 'http://i2:9000'],
            stripPrefix: true,
          },
          {
            name: 'payments',
            prefix: '/payments',
            upstream: 'https://payments:8443',
            retryAttempts: 1,
            maxInFlight: 10,
            rateLimitPerSec: 5,
          },
        ],
      }),
    }, read);
    const [inventory, payments] = c.routes;
    expect(inventory).toMatchObject({ name: 'inventory', retryAttempts: 4, tryTimeoutMs: 700, stripPrefix: true });
    expect(inventory.upstreams.map((u) => u.host)).toEqual(['i1:9000', 'i2:9000']);
    expect(payments).toMatchObject({
      name: 'payments',
      retryAttempts: 1,
      tryTimeoutMs: 700,
      maxInFlight: 10,
      rateLimitPerSec: 5,
      rateLimitBurst: 5,
      tls: null,
    });
  });

  it('points every problem at its exact field, all in one error', () => {
    const file = routesFile({
      routes: [
        { name: 'ok', prefix: '/ok', upstream: 'http://ok' },
        {
          name: 'bad one',
          prefix: 'inventory',
          upstream: 'ftp://x',
          retryAttempts: 0,
          retryAtempts: 3,
          stripPrefix: 'yes',
        },
        { name: 'dup', prefix: '/ok', upstream: 'http://y', tls: { caFile: '/nope.pem', pinned: true } },
      ],
    });
    let error: ConfigError | undefined;
    try {
      loadConfig({ ROUTES_FILE: file, UPSTREAM_URL: 'http://z' }, read);
    } catch (e) {
      error = e as ConfigError;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const at = `ROUTES_FILE=${JSON.stringify(file)}: `;
    expect(error!.problems).toEqual(expect.arrayContaining([
      'UPSTREAM_URL="http://z": expected nothing when ROUTES_FILE is set: each route names its upstream and TLS files',
      `${at}routes[1].retryAtempts: expected no such field: one of ${
        ['name', 'host', 'prefix', 'stripPrefix', 'upstream', 'tls'].join(', ')
      }, retryAttempts, retryBackoffMs, retryBackoffMaxMs, retryBudgetPercent, retryBudgetMinPerSec, retryBodyMaxBytes, tryTimeoutMs, requestTimeoutMs, breakerFailures, breakerOpenMs, breakerOpenMaxMs, breakerProbes, maxInFlight, queueSize, queueTimeoutMs, rateLimitPerSec, rateLimitBurst, rateLimitWaitMs, dnsRefreshMs, got 3`,
      `${at}routes[1].name: expected a name of letters, digits, _ . -, got "bad one"`,
      `${at}routes[1].prefix: expected a path prefix starting with /, percent-encoded as a request would send it, without . or .. segments, got "inventory"`,
      `${at}routes[1].stripPrefix: expected true or false, got "yes"`,
      `${at}routes[1].upstream: expected http:// or https:// URLs (comma-separated) with a host and no credentials, query or fragment, got "ftp://x"`,
      `${at}routes[1].retryAttempts: expected a whole number from 1 to 100, got 0`,
      `${at}routes[2].tls.pinned: expected no such field: one of caFile, certFile, keyFile, serverName, minVersion, got true`,
      `${at}routes[2].prefix: expected a prefix and host no other route has (any host /ok), got "/ok"`,
    ]));
    expect(
      error!.problems.some((p) =>
        p.includes('routes[2].tls.caFile') && p.includes('/nope.pem') && p.includes('readable file')
      ),
    ).toBe(true);
    expect(error!.problems.some((p) => p.includes('routes[2].tls.caFile') && p.includes('only with https://'))).toBe(
      true,
    );
  });

  it('says when the file is missing, is not JSON, or has no routes', () => {
    expect(() => loadConfig({ ROUTES_FILE: '/nonexistent/routes.json' }, read)).toThrow(
      /ROUTES_FILE="\/nonexistent\/routes.json": expected a readable JSON file \(.*ENOENT/,
    );
    expect(() => loadConfig({ ROUTES_FILE: routesFile('{"routes": [') }, read)).toThrow(
      /ROUTES_FILE=".*": expected a readable JSON file \(.*JSON/,
    );
    expect(() => loadConfig({ ROUTES_FILE: routesFile({ routes: [] }) }, read)).toThrow(
      /routes: expected a non-empty array of routes/,
    );
  });
});
