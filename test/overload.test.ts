/** Never OOM-killed by design: each artifact, inside a cgroup with a memory limit, reads that limit at start
 * and, once its resident memory is past MEMORY_SHED_PERCENT of it, answers new requests 503 with Retry-After
 * (nothing reaches the upstream), and says so in the log and in /metrics (the guard's way back below it:
 * test/unit/overload.test.ts). The shedding is brought on by a share below what the process already holds;
 * where no cgroup can be made (not root) it is skipped, with the reason. */
import { describe, expect, it } from 'vitest';
import { cannotMakeGroups, type Limits, makeGroup } from '../bench/cgroup.ts';
import {
  ARTIFACTS,
  onStop,
  runtimeOf,
  scrape,
  skippedBecause,
  startAmbassador,
  startUpstream,
  stopAfterEach,
  waitFor,
} from './helpers.ts';

const limits: Limits = { cpuMillis: 1000, memoryBytes: 512 * 1024 ** 2 };
const unavailable = await cannotMakeGroups(limits);

/** What the start's warning said could not be read, one list a warning (none where the limits were read). */
function unreadLimits(amb: { logs(): Array<Record<string, unknown>> }): unknown[] {
  const told = amb.logs().filter((l) => l.level === 'warn' && String(l.msg).includes('limits could not be read'));
  return told.map((l) => l.unread);
}

/** Starts the ambassador inside a cgroup of its own with `limits` (or `own`). */
async function inGroup(artifact: (typeof ARTIFACTS)[number], env: Record<string, string>, own = limits) {
  const group = makeGroup(`ambassador-overload-${process.pid}-${Math.round(Math.random() * 1e6)}`, own);
  onStop(() => group.remove());
  const join = group.procs.map((f) => `echo $$ > ${f}`).join('; ');
  return startAmbassador(artifact, env, ['sh', '-c', `${join}; exec "$@"`, 'sh']);
}

describe.skipIf(unavailable !== undefined).each(ARTIFACTS)(
  skippedBecause('memory near the cgroup limit (%s)', unavailable && `no cgroup can be made here (${unavailable})`),
  (artifact) => {
    stopAfterEach();

    it("reads the cgroup's limit at start and takes requests while below MEMORY_SHED_PERCENT of it", async () => {
      const upstream = await startUpstream();
      const amb = await inGroup(artifact, { UPSTREAM_URL: upstream.url });
      expect((await fetch(`${amb.url}/ok`)).status).toBe(200);
      const metrics = await scrape(amb);
      // Deno 2 may read neither /proc/self nor /sys without --allow-all (denoland/deno#27564), in a container or
      // out of one: it finds no limit, and says so at start, naming the variables that give them.
      const deno = runtimeOf(artifact) === 'deno';
      const found = deno ? null : limits.memoryBytes;
      expect(unreadLimits(amb)).toEqual(deno ? [['MEMORY_LIMIT_BYTES', 'CPU_LIMIT_MILLICORES']] : []);
      expect(metrics.get('ambassador_memory_limit_bytes')).toBe(found ?? undefined);
      expect(metrics.get('ambassador_memory_shedding')).toBe(0);
      expect(amb.logs().find((l) => l.msg === 'listening')?.memory_limit_bytes).toBe(found);
      // And holds the requests in flight to one per 4 MiB of it (PROCESS_MAX_IN_FLIGHT unset).
      const places = found === null ? 0 : found / (4 * 1024 ** 2);
      expect(amb.logs().find((l) => l.msg === 'listening')?.process_max_in_flight).toBe(places);
      expect(metrics.get('ambassador_process_max_in_flight')).toBe(places || undefined);
      // The group's CPU limit, a whole core, is read too; it allows more places than the memory does.
      const cores = deno ? null : limits.cpuMillis / 1000;
      expect(amb.logs().find((l) => l.msg === 'listening')?.cpu_limit_cores).toBe(cores);
      expect(metrics.get('ambassador_cpu_limit_cores')).toBe(cores ?? undefined);
    });

    it("sizes the places by the group's CPU limit where that allows fewer than its memory limit", async () => {
      const upstream = await startUpstream();
      const amb = await inGroup(artifact, { UPSTREAM_URL: upstream.url }, { ...limits, cpuMillis: 150 });
      expect((await fetch(`${amb.url}/ok`)).status).toBe(200);
      // 150m: one place per 3 ms of CPU a second is 50, fewer than the memory's 128 (Deno finds neither).
      const places = runtimeOf(artifact) === 'deno' ? 0 : 50;
      expect(amb.logs().find((l) => l.msg === 'listening')?.process_max_in_flight).toBe(places);
      expect((await scrape(amb)).get('ambassador_process_max_in_flight')).toBe(places || undefined);
    });

    it("takes CPU_LIMIT_MILLICORES over the cgroup's limit", async () => {
      const upstream = await startUpstream();
      const amb = await inGroup(artifact, { UPSTREAM_URL: upstream.url, CPU_LIMIT_MILLICORES: '20' });
      const metrics = await scrape(amb);
      expect(metrics.get('ambassador_cpu_limit_cores')).toBe(0.02);
      expect(metrics.get('ambassador_process_max_in_flight')).toBe(6);
      // Deno, given the CPU limit, still says what it could not read: the memory limit.
      expect(unreadLimits(amb)).toEqual(runtimeOf(artifact) === 'deno' ? [['MEMORY_LIMIT_BYTES']] : []);
    });

    it('past that share, answers new requests 503 with Retry-After, never reaching the upstream, and says so', async () => {
      // /held is answered when the test says: a request in flight, holding its place.
      let answerHeld = () => {};
      const upstream = await startUpstream((req, res) => {
        if (req.url === '/held') answerHeld = () => res.end('held');
        else res.end('ok');
      });
      // 1% of 512 MiB is about 5 MiB: less than any runtime holds once started.
      const amb = await inGroup(artifact, {
        UPSTREAM_URL: upstream.url,
        MEMORY_SHED_PERCENT: '1',
        ...(runtimeOf(artifact) === 'deno' ? { MEMORY_LIMIT_BYTES: String(limits.memoryBytes) } : {}),
      });
      await amb.waitForLine((l) => l.includes('memory near the limit'));
      // With none in flight there is no growth to stop: a request alone is taken on, so a process whose memory
      // stays up after a burst still serves rather than answer 503 for ever.
      const alone = await fetch(`${amb.url}/alone`);
      expect([alone.status, await alone.text()]).toEqual([200, 'ok']);
      const held = fetch(`${amb.url}/held`);
      await waitFor('the held request at the upstream', () => upstream.seen.some((s) => s.url === '/held'));
      const res = await fetch(`${amb.url}/orders`);
      expect(res.status).toBe(503);
      expect(res.headers.get('retry-after')).toBe('1');
      expect(res.headers.get('x-request-id')).toBeTruthy();
      expect(await res.text()).toMatch(/^ambassador: memory: \d+ MiB in use, past 1% of the 512 MiB limit\n$/);
      expect(upstream.seen.map((s) => s.url)).toEqual(['/alone', '/held']);
      answerHeld();
      expect((await held).status).toBe(200);
      const metrics = await scrape(amb);
      expect(metrics.get('ambassador_memory_shedding')).toBe(1);
      expect(metrics.get('ambassador_requests_rejected_total{route="default",reason="memory"}')).toBe(1);
      await amb.settled();
      expect(amb.logs().some((l) => l.level === 'warn' && l.rejected === 'memory' && l.status === 503)).toBe(true);
      // The admin port still answers: the kubelet's probes must see the process alive.
      expect((await fetch(`${amb.adminUrl}/healthz`)).status).toBe(200);
    });

    it("takes MEMORY_LIMIT_BYTES over the cgroup's limit", async () => {
      const upstream = await startUpstream();
      const amb = await inGroup(artifact, { UPSTREAM_URL: upstream.url, MEMORY_LIMIT_BYTES: String(1024 ** 2) });
      await amb.waitForLine((l) => l.includes('memory near the limit'));
      const metrics = await scrape(amb);
      expect(metrics.get('ambassador_memory_limit_bytes')).toBe(1024 ** 2);
      expect(metrics.get('ambassador_memory_shedding')).toBe(1);
    });
  },
);
