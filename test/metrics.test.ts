/** /metrics on the admin port: the counts match what the test sent and what the upstream saw, promtool
 * accepts the exposition, and a real Prometheus server scrapes it and answers PromQL about it. */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  type AmbassadorProc,
  ARTIFACTS,
  deadPort,
  parseMetrics as parse,
  rawRequest,
  runtimeOf,
  skippedBecause,
  sleep,
  startAmbassador,
  startProcess,
  startUpstream,
  type Upstream,
} from './helpers.ts';

const has = (tool: string) => spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;

describe.each(ARTIFACTS)('metrics (%s)', (runtime) => {
  let upstream: Upstream;
  let amb: AmbassadorProc;
  beforeAll(async () => {
    // Every odd-numbered request fails with 503: a GET is then retried once, a POST is not.
    upstream = await startUpstream((_q, res, _s, n) => {
      res.writeHead(n % 2 === 1 ? 503 : 200);
      res.end('x');
    });
    amb = await startAmbassador(runtime, {
      UPSTREAM_URL: upstream.url,
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    for (let i = 0; i < 10; i++) await (await fetch(`${amb.url}/get`)).text();
    await (await fetch(`${amb.url}/post`, { method: 'POST', body: 'x' })).text(); // request 21: 503, not retried
    await rawRequest(amb.port, 'TRACE /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
  });
  afterAll(async () => {
    await amb?.stop();
    await upstream?.close();
  });

  it('counts requests, retries and failed attempts exactly as the upstream saw them', async () => {
    expect(upstream.seen.length).toBe(21);
    const res = await fetch(`${amb.adminUrl}/metrics`);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const m = parse(await res.text());
    expect(m.get('ambassador_requests_total{route="default",method="GET",code="200"}')).toBe(10);
    expect(m.get('ambassador_requests_total{route="default",method="POST",code="503"}')).toBe(1);
    expect(m.get('ambassador_requests_total{route="",method="other",code="405"}')).toBe(1);
    expect(m.get('ambassador_upstream_retries_total{route="default"}')).toBe(10);
    expect(m.get('ambassador_upstream_attempt_failures_total{route="default",reason="503"}')).toBe(11);
    expect(m.get('ambassador_upstream_retries_skipped_total{route="default",reason="method"}')).toBe(1);
    expect(m.get('ambassador_upstream_response_seconds_count')).toBe(21);
    expect(m.get('ambassador_request_duration_seconds_count')).toBe(12);
    expect(m.get('ambassador_requests_in_flight')).toBe(0);
    expect(m.get('ambassador_draining')).toBe(0);
    expect(m.get(`ambassador_build_info{version="0.1.0",runtime="${runtimeOf(runtime)}"}`)).toBe(1);
    expect(m.get('process_resident_memory_bytes')).toBeGreaterThan(1e6);
    expect(m.get('process_start_time_seconds')).toBeGreaterThan(1.7e9);
  });

  it('counts connection failures by reason', async () => {
    const dead = await startAmbassador(runtime, {
      UPSTREAM_URL: `http://127.0.0.1:${await deadPort()}`,
      RETRY_BACKOFF_MS: '0',
      RETRY_BACKOFF_MAX_MS: '0',
    });
    try {
      await (await fetch(`${dead.url}/x`)).text();
      const m = parse(await (await fetch(`${dead.adminUrl}/metrics`)).text());
      expect(m.get('ambassador_upstream_attempt_failures_total{route="default",reason="refused"}')).toBe(3);
      expect(m.get('ambassador_upstream_retries_skipped_total{route="default",reason="attempts"}')).toBe(1);
      expect(m.get('ambassador_requests_total{route="default",method="GET",code="502"}')).toBe(1);
    } finally {
      await dead.stop();
    }
  });

  it('speaks OpenMetrics when the scraper asks for it', async () => {
    const res = await fetch(`${amb.adminUrl}/metrics`, {
      headers: { accept: 'application/openmetrics-text; version=1.0.0' },
    });
    expect(res.headers.get('content-type')).toMatch(/^application\/openmetrics-text; version=1\.0\.0/);
    const text = await res.text();
    expect(text).toContain('# TYPE ambassador_requests counter\n');
    expect(text.endsWith('# EOF\n')).toBe(true);
  });

  it.skipIf(!has('promtool'))(
    skippedBecause(
      'passes promtool check metrics',
      has('promtool') ? undefined : 'promtool not installed (Debian package prometheus)',
    ),
    async () => {
      const text = await (await fetch(`${amb.adminUrl}/metrics`)).text();
      const check = spawnSync('promtool', ['check', 'metrics'], { input: text });
      expect(check.stderr.toString() + check.stdout.toString()).toBe('');
      expect(check.status).toBe(0);
    },
  );
});

describe.skipIf(!has('prometheus'))(
  skippedBecause(
    'a real Prometheus server scraping the ambassador',
    has('prometheus') ? undefined : 'prometheus not installed (Debian package prometheus)',
  ),
  () => {
    it('answers PromQL with the request and retry counts the test caused', async () => {
      const upstream = await startUpstream((_q, res, _s, n) => {
        res.writeHead(n % 2 === 1 ? 503 : 200);
        res.end();
      });
      const amb = await startAmbassador('node', {
        UPSTREAM_URL: upstream.url,
        RETRY_BACKOFF_MS: '0',
        RETRY_BACKOFF_MAX_MS: '0',
      });
      const dir = mkdtempSync(path.join(os.tmpdir(), 'ambassador-prom-'));
      const port = await deadPort();
      writeFileSync(
        path.join(dir, 'prometheus.yml'),
        [
          'global: { scrape_interval: 1s, evaluation_interval: 1s }',
          'scrape_configs:',
          '  - job_name: ambassador',
          `    static_configs: [{ targets: ["127.0.0.1:${amb.adminPort}"] }]`,
        ].join('\n'),
      );
      const prom = startProcess([
        'prometheus',
        `--config.file=${path.join(dir, 'prometheus.yml')}`,
        `--storage.tsdb.path=${path.join(dir, 'data')}`,
        `--web.listen-address=127.0.0.1:${port}`,
      ], {});
      try {
        for (let i = 0; i < 6; i++) await (await fetch(`${amb.url}/x`)).text();
        const query = async (q: string) => {
          const res = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(q)}`);
          const body = (await res.json()) as { data: { result: Array<{ value: [number, string] }> } };
          return body.data.result[0]?.value[1];
        };
        let requests: string | undefined;
        let retries: string | undefined;
        for (let i = 0; i < 60 && (requests !== '6' || retries !== '6'); i++) {
          await sleep(500);
          try {
            requests = await query('sum(ambassador_requests_total{code="200"})');
            retries = await query('ambassador_upstream_retries_total{route="default"}');
          } catch {
            // Prometheus still starting
          }
        }
        expect(requests).toBe('6');
        expect(retries).toBe('6');
        expect(upstream.seen.length).toBe(12);
      } finally {
        prom.kill('SIGTERM');
        await prom.exited;
        await amb.stop();
        await upstream.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  },
);
