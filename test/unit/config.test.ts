/** Configuration: parsed by a pure function; one error naming every bad variable, its value and what was
 * expected (the process stopping on it: test/config.test.ts). */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkRuntime, ConfigError, loadConfig } from '../../ambassador.ts';

const read = (file: string) => readFileSync(file, 'utf8');
/** The files this file's tests write, in one folder removed when they are done. */
const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-config-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let files = 0;
const tempFile = (text: string) => {
  const f = path.join(dir, `routes-${++files}.json`);
  writeFileSync(f, text);
  return f;
};

describe('loadConfig', () => {
  it('applies the documented defaults', () => {
    const c = loadConfig({ UPSTREAM_URL: 'http://inventory-service:9000' });
    expect(c).toMatchObject({
      host: '127.0.0.1',
      port: 8080,
      adminHost: '0.0.0.0',
      adminPort: 9901,
      drainTimeoutMs: 20000,
      logFormat: 'json',
      logLevel: 'info',
      routesFile: null,
    });
    expect(c.routes).toHaveLength(1);
    expect(c.routes[0]).toMatchObject({
      name: 'default',
      host: null,
      prefix: '/',
      stripPrefix: false,
      tls: null,
      retryAttempts: 3,
      retryBackoffMs: 100,
      retryBackoffMaxMs: 2000,
      tryTimeoutMs: 5000,
      requestTimeoutMs: 15000,
      breakerFailures: 5,
      breakerOpenMs: 5000,
      breakerOpenMaxMs: 60000,
      breakerProbes: 1,
      maxInFlight: 1024,
      queueSize: 128,
      queueTimeoutMs: 1000,
      rateLimitPerSec: 0,
      dnsRefreshMs: 5000,
    });
    expect(c.routes[0].upstreams.map((u) => u.href)).toEqual(['http://inventory-service:9000/']);
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.routes[0])).toBe(true);
  });

  it('names every bad variable, its value and what was expected, in one error', () => {
    let error: unknown;
    try {
      loadConfig({
        UPSTREAM_URL: 'ftp://x',
        RETRY_ATTEMPTS: 'three',
        TRY_TIMEOUT_MS: '-5',
        LOG_FORMAT: 'xml',
        PORT: '70000',
      });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const message = (error as Error).message;
    expect(message).toContain('UPSTREAM_URL="ftp://x": expected http:// or https:// URLs');
    expect(message).toContain('RETRY_ATTEMPTS="three": expected a whole number from 1 to 100');
    expect(message).toContain('TRY_TIMEOUT_MS="-5": expected a whole number from 0');
    expect(message).toContain('LOG_FORMAT="xml": expected one of json, text');
    expect(message).toContain('PORT="70000": expected a whole number from 0 to 65535');
    expect((error as ConfigError).problems).toHaveLength(5);
  });

  it('takes a comma-separated list of upstream URLs, each host:port once', () => {
    const c = loadConfig({ UPSTREAM_URL: 'http://10.0.0.1:9000, http://10.0.0.2:9000' });
    expect(c.routes[0].upstreams.map((u) => u.host)).toEqual(['10.0.0.1:9000', '10.0.0.2:9000']);
    expect(() => loadConfig({ UPSTREAM_URL: 'http://a:1,http://a:1' })).toThrow(/UPSTREAM_URL=.*a:1 is named twice/);
  });

  it("gives a rate limit without a burst one second's worth of burst", () => {
    expect(loadConfig({ UPSTREAM_URL: 'http://h', RATE_LIMIT_PER_SEC: '50' }).routes[0].rateLimitBurst).toBe(50);
    expect(
      loadConfig({ UPSTREAM_URL: 'http://h', RATE_LIMIT_PER_SEC: '50', RATE_LIMIT_BURST: '5' }).routes[0]
        .rateLimitBurst,
    ).toBe(5);
  });

  it('refuses a breaker whose longest open period is below its first', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', BREAKER_OPEN_MS: '5000', BREAKER_OPEN_MAX_MS: '1000' }))
      .toThrow(/BREAKER_OPEN_MAX_MS="1000": expected a value at least BREAKER_OPEN_MS/);
  });

  it('requires UPSTREAM_URL', () => {
    expect(() => loadConfig({})).toThrow(/UPSTREAM_URL is not set/);
  });

  it('refuses credentials in UPSTREAM_URL, which would end up in logs', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://user:secret@host' })).toThrow(/UPSTREAM_URL=.*no credentials/);
  });

  it('takes SCHED_POLICY normal (the default) or batch, and a runtime that cannot set it refuses batch', () => {
    expect(loadConfig({ UPSTREAM_URL: 'http://h' }).schedPolicy).toBe('normal');
    expect(loadConfig({ UPSTREAM_URL: 'http://h', SCHED_POLICY: 'Batch' }).schedPolicy).toBe('batch');
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', SCHED_POLICY: 'idle' }))
      .toThrow('SCHED_POLICY="idle": expected one of normal, batch');
    const runtime = { name: 'node' as const, readFile: () => '', checkTls: () => {}, tlsLimits: null };
    const batch = loadConfig({ UPSTREAM_URL: 'http://h', SCHED_POLICY: 'batch' });
    expect(() => checkRuntime(batch, runtime)).toThrow(
      `SCHED_POLICY="batch": expected normal on node, which has no way to set a thread's scheduling policy`,
    );
    expect(() => checkRuntime(batch, { ...runtime, name: 'bun', scheduleBatch: () => {} })).not.toThrow();
    expect(() => checkRuntime(loadConfig({ UPSTREAM_URL: 'http://h' }), runtime)).not.toThrow();
  });

  it('refuses a backoff cap below its base', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', RETRY_BACKOFF_MS: '500', RETRY_BACKOFF_MAX_MS: '100' }))
      .toThrow(/RETRY_BACKOFF_MAX_MS="100"/);
  });

  it('names a cap below its base where it was set: the routes-file field, or the variable a route left it to', () => {
    const file = tempFile(JSON.stringify({
      routes: [
        { name: 'a', prefix: '/a', upstream: 'http://a', retryBackoffMaxMs: 50 },
        { name: 'b', prefix: '/b', upstream: 'http://b' },
      ],
    }));
    let error: ConfigError | undefined;
    try {
      loadConfig({ ROUTES_FILE: file, BREAKER_OPEN_MS: '9000', BREAKER_OPEN_MAX_MS: '8000' }, read);
    } catch (e) {
      error = e as ConfigError;
    }
    // One problem each, said once however many routes share the default, each named where its user set it.
    expect(error?.problems).toEqual([
      `ROUTES_FILE=${
        JSON.stringify(file)
      }: routes[0].retryBackoffMaxMs: expected a value at least RETRY_BACKOFF_MS (100), got 50`,
      'BREAKER_OPEN_MAX_MS="8000": expected a value at least BREAKER_OPEN_MS (9000)',
    ]);
  });
});

describe('loadConfig: values that would fail late, or never match', () => {
  it('holds every time setting, variable and routes-file field alike, to what a timer can wait (2^31 - 1 ms)', () => {
    const times = [
      'RETRY_BACKOFF_MS',
      'RETRY_BACKOFF_MAX_MS',
      'TRY_TIMEOUT_MS',
      'REQUEST_TIMEOUT_MS',
      'BREAKER_OPEN_MS',
      'BREAKER_OPEN_MAX_MS',
      'QUEUE_TIMEOUT_MS',
      'RATE_LIMIT_WAIT_MS',
      'DNS_REFRESH_MS',
      'DRAIN_TIMEOUT_MS',
      'DRAIN_GRACE_MS',
      'BODY_IDLE_TIMEOUT_MS',
      'QUEUE_NEWEST_FIRST_MS',
    ];
    const over = Object.fromEntries(times.map((t) => [t, '2147483648']));
    const err = (() => {
      try {
        loadConfig({ UPSTREAM_URL: 'http://a:1', ...over });
      } catch (e) {
        return e as ConfigError;
      }
    })();
    expect(err).toBeInstanceOf(ConfigError);
    for (const t of times) {
      expect(err!.message).toContain(
        `${t}="2147483648": expected a whole number from 0 to 2147483647`.replace(
          'from 0',
          t.startsWith('BREAKER_OPEN') ? 'from 1' : 'from 0',
        ),
      );
    }
    const max = Object.fromEntries(times.map((t) => [t, '2147483647']));
    expect(loadConfig({ UPSTREAM_URL: 'http://a:1', ...max }).drainTimeoutMs).toBe(2147483647);
    const file = tempFile(
      JSON.stringify({ routes: [{ name: 'r', prefix: '/', upstream: 'http://a:1', queueTimeoutMs: 2 ** 31 }] }),
    );
    expect(() => loadConfig({ ROUTES_FILE: file }, read)).toThrow(
      /routes\[0\]\.queueTimeoutMs: expected a whole number from 0 to 2147483647/,
    );
  });

  it('refuses listen addresses that are not addresses, and one port for both listeners where they overlap', () => {
    for (const host of ['not-an-ip', '127.0.0.1:80', '999.1.1.1', 'example.com', '::1::1::']) {
      expect(() => loadConfig({ UPSTREAM_URL: 'http://h', HOST: host }), host).toThrow(
        new RegExp(`HOST=${JSON.stringify(host).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: expected an IP address`),
      );
      expect(() => loadConfig({ UPSTREAM_URL: 'http://h', ADMIN_HOST: host }), host).toThrow(/ADMIN_HOST=/);
    }
    for (const host of ['127.0.0.1', '0.0.0.0', '::1', '::', 'localhost', '10.1.2.3', 'fe80::1']) {
      expect(loadConfig({ UPSTREAM_URL: 'http://h', HOST: host }).host).toBe(host);
    }
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', PORT: '9000', ADMIN_PORT: '9000' })).toThrow(
      /ADMIN_PORT="9000": expected a port other than PORT/,
    );
    expect(() =>
      loadConfig({ UPSTREAM_URL: 'http://h', PORT: '9000', ADMIN_PORT: '9000', HOST: '127.0.0.1', ADMIN_HOST: '::' })
    ).toThrow(/ADMIN_PORT/);
    expect(
      loadConfig({
        UPSTREAM_URL: 'http://h',
        PORT: '9000',
        ADMIN_PORT: '9000',
        HOST: '127.0.0.1',
        ADMIN_HOST: '10.1.2.3',
      }).adminPort,
    ).toBe(9000);
    expect(loadConfig({ UPSTREAM_URL: 'http://h', PORT: '0', ADMIN_PORT: '0' }).port).toBe(0);
  });

  it('refuses upstream URLs with port 0 or a bare ? or #', () => {
    for (const url of ['http://h:0', 'http://h/?', 'http://h/#', 'http://h/a?b=1', 'http://h#x']) {
      expect(() => loadConfig({ UPSTREAM_URL: url }), url).toThrow(/UPSTREAM_URL=/);
    }
  });

  it("refuses route prefixes that could never match a request's path", () => {
    const file = (prefix: string) =>
      tempFile(JSON.stringify({ routes: [{ name: 'r', prefix, upstream: 'http://h' }] }));
    for (const prefix of ['/a/../b', '/a/./b', '/%2e%2e/b', '/a b', '/caf\u00e9', '/a%zz', '/a\\b']) {
      expect(() => loadConfig({ ROUTES_FILE: file(prefix) }, read), prefix).toThrow(
        /routes\[0\]\.prefix: expected a path prefix/,
      );
    }
    for (const prefix of ['/', '/inventory', '/a%2Fb', '/v1.2/items', '/a/']) {
      expect(loadConfig({ ROUTES_FILE: file(prefix) }, read).routes[0].prefix, prefix).toBe(
        prefix === '/a/' ? '/a' : prefix,
      );
    }
  });

  it('checks a routes file of 20,000 routes in well under a second', () => {
    const f = tempFile(
      JSON.stringify({
        routes: Array.from(
          { length: 20_000 },
          (_, i) => ({ name: `r${i}`, prefix: `/p${i}`, upstream: `http://h${i % 50}:${9000 + (i % 7)}` }),
        ),
      }),
    );
    const t0 = performance.now();
    expect(loadConfig({ ROUTES_FILE: f }, read).routes).toHaveLength(20_000);
    // Quadratic checking took over a minute here; the bound leaves a loaded machine plenty of room.
    expect(performance.now() - t0).toBeLessThan(5000);
  });
});
