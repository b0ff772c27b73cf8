/** Configuration: parsed by a pure function; bad values stop the process before it listens, with exit
 * code 2 and one message naming every bad variable, its value and what was expected. */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../ambassador.ts';
import { RUNTIMES, command, startProcess } from './helpers.ts';

describe('loadConfig', () => {
  it('applies the documented defaults', () => {
    const c = loadConfig({ UPSTREAM_URL: 'http://inventory-service:9000' });
    expect(c).toMatchObject({
      host: '127.0.0.1', port: 8080, adminHost: '0.0.0.0', adminPort: 9901, retryAttempts: 3, retryBackoffMs: 100,
      retryBackoffMaxMs: 2000, tryTimeoutMs: 5000, requestTimeoutMs: 15000, drainTimeoutMs: 20000, logFormat: 'json', logLevel: 'info',
    });
    expect(c.upstream.href).toBe('http://inventory-service:9000/');
    expect(Object.isFrozen(c)).toBe(true);
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
    expect(message).toContain('UPSTREAM_URL="ftp://x": expected an http:// or https:// URL');
    expect(message).toContain('RETRY_ATTEMPTS="three": expected a whole number from 1 to 100');
    expect(message).toContain('TRY_TIMEOUT_MS="-5": expected a whole number from 0');
    expect(message).toContain('LOG_FORMAT="xml": expected one of json, text');
    expect(message).toContain('PORT="70000": expected a whole number from 0 to 65535');
    expect((error as ConfigError).problems).toHaveLength(5);
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
