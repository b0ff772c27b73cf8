/** Configuration: parsed by a pure function; bad values stop the process before it listens, with exit
 * code 2 and one message naming every bad variable, its value and what was expected. */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../ambassador.ts';
import { RUNTIMES, command, startProcess } from './helpers.ts';

describe('loadConfig', () => {
  it('applies the documented defaults', () => {
    const c = loadConfig({ UPSTREAM_URL: 'http://inventory-service:9000' });
    expect(c).toMatchObject({
      host: '127.0.0.1', port: 8080, adminHost: '0.0.0.0', adminPort: 9901, drainTimeoutMs: 20000, logFormat: 'json', logLevel: 'info', routesFile: null,
    });
    expect(c.routes).toHaveLength(1);
    expect(c.routes[0]).toMatchObject({
      name: 'default', host: null, prefix: '/', stripPrefix: false, tls: null, retryAttempts: 3, retryBackoffMs: 100,
      retryBackoffMaxMs: 2000, tryTimeoutMs: 5000, requestTimeoutMs: 15000, breakerFailures: 5, breakerOpenMs: 5000,
      breakerOpenMaxMs: 60000, breakerProbes: 1, maxInFlight: 1024, queueSize: 128, queueTimeoutMs: 1000, rateLimitPerSec: 0,
      dnsRefreshMs: 5000,
    });
    expect(c.routes[0].upstreams.map((u) => u.href)).toEqual(['http://inventory-service:9000/']);
    expect(Object.isFrozen(c)).toBe(true);
    expect(Object.isFrozen(c.routes[0])).toBe(true);
  });

  it('names every bad variable, its value and what was expected, in one error', () => {
    let error: unknown;
    try {
      loadConfig({ UPSTREAM_URL: 'ftp://x', RETRY_ATTEMPTS: 'three', TRY_TIMEOUT_MS: '-5', LOG_FORMAT: 'xml', PORT: '70000' });
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

  it('gives a rate limit without a burst one second\'s worth of burst', () => {
    expect(loadConfig({ UPSTREAM_URL: 'http://h', RATE_LIMIT_PER_SEC: '50' }).routes[0].rateLimitBurst).toBe(50);
    expect(loadConfig({ UPSTREAM_URL: 'http://h', RATE_LIMIT_PER_SEC: '50', RATE_LIMIT_BURST: '5' }).routes[0].rateLimitBurst).toBe(5);
  });

  it('refuses a breaker whose longest open period is below its first', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', BREAKER_OPEN_MS: '5000', BREAKER_OPEN_MAX_MS: '1000' })).toThrow(/BREAKER_OPEN_MAX_MS="1000": expected a value at least BREAKER_OPEN_MS/);
  });

  it('requires UPSTREAM_URL', () => {
    expect(() => loadConfig({})).toThrow(/UPSTREAM_URL is not set/);
  });

  it('refuses credentials in UPSTREAM_URL, which would end up in logs', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://user:secret@host' })).toThrow(/UPSTREAM_URL=.*no credentials/);
  });

  it('refuses a backoff cap below its base', () => {
    expect(() => loadConfig({ UPSTREAM_URL: 'http://h', RETRY_BACKOFF_MS: '500', RETRY_BACKOFF_MAX_MS: '100' })).toThrow(/RETRY_BACKOFF_MAX_MS="100"/);
  });
});

describe.each(RUNTIMES)('bad configuration stops the process (%s)', (runtime) => {
  it('exits 2 before listening, naming every bad variable on stderr', async () => {
    const p = startProcess(command(runtime), { UPSTREAM_URL: 'not a url', RETRY_ATTEMPTS: '0', LOG_FORMAT: 'yaml', PORT: '0', ADMIN_PORT: '0' });
    const { code } = await p.exited;
    expect(code).toBe(2);
    const err = p.stderr.join('\n');
    expect(err).toContain('UPSTREAM_URL="not a url"');
    expect(err).toContain('RETRY_ATTEMPTS="0"');
    expect(err).toContain('LOG_FORMAT="yaml"');
    expect(p.lines.join('\n')).not.toContain('listening');
  });
});
