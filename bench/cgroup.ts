/**
 * A cgroup with a pod's CPU and memory limits (those of the ambassador container in k8s/), for the
 * pod-budget benchmark and the memory test: cgroup v2 where the machine has it, else v1's memory and cpu
 * hierarchies. Root is needed to make one.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { root, sleep } from './common.ts';

// ---------------------------------------------------------------------------------------------------------
// The limits, from the manifest the pod runs with.
// ---------------------------------------------------------------------------------------------------------

export interface Limits {
  cpuMillis: number;
  memoryBytes: number;
}

/** The ambassador container of k8s/order-service.yaml's pod, as the manifest gives it. */
function ambassadorContainer(): {
  resources?: { limits?: { cpu?: unknown; memory?: unknown } };
  env?: Array<{ name: string; value?: string }>;
} | undefined {
  const docs = parseAllDocuments(readFileSync(path.join(root, 'k8s', 'order-service.yaml'), 'utf8')).map((d) =>
    d.toJS()
  );
  const pod = docs.find((d) => d?.kind === 'Deployment')?.spec?.template?.spec;
  return [...(pod?.initContainers ?? []), ...(pod?.containers ?? [])].find((c: { name: string }) =>
    c.name === 'ambassador'
  );
}

export function podLimits(): Limits {
  const { cpu, memory } = ambassadorContainer()?.resources?.limits ?? {};
  const cpuMillis = String(cpu).endsWith('m') ? Number(String(cpu).slice(0, -1)) : Number(cpu) * 1000;
  const units: Record<string, number> = { Ki: 1024, Mi: 1024 ** 2, Gi: 1024 ** 3 };
  const m = /^(\d+)(Ki|Mi|Gi)?$/.exec(String(memory));
  if (!Number.isFinite(cpuMillis) || !m) {
    throw new Error(
      `k8s/order-service.yaml: no CPU and memory limits on the ambassador container (found ${cpu}, ${memory})`,
    );
  }
  return { cpuMillis, memoryBytes: Number(m[1]) * (m[2] ? units[m[2]] : 1) };
}

/** The LOG_LEVEL the manifests run the ambassador at: the container's own setting, else the default (`info`),
 * so the pod benchmark pays for the access line the pod writes. */
export function podLogLevel(): string {
  return ambassadorContainer()?.env?.find((e) => e.name === 'LOG_LEVEL')?.value ?? 'info';
}

// ---------------------------------------------------------------------------------------------------------
// A cgroup with those limits: v2, or v1's memory and cpu hierarchies.
// ---------------------------------------------------------------------------------------------------------

export interface Group {
  /** the cgroup.procs files a process is written into before it execs the artifact */
  procs: string[];
  /** the group's peak charge, the page cache its processes read included (it fills up to the limit) */
  peakBytes(): number;
  /** the sum of its live processes' own peaks (VmHWM: what each had resident at most, its mapped code with it) */
  peakRssBytes(): number;
  oomKills(): number;
  /** its memory now, from memory.stat: anonymous (heaps, buffers) and mapped file pages (the code its processes
   * run, which the kernel takes back first when the group is full), in bytes */
  memoryNow(): { anonBytes: number; mappedBytes: number };
  /** ends every process left in the group (nginx's workers outlive their master), then removes it */
  remove(): Promise<void>;
}

/** Kills what is in the group, waits for it to be empty, then removes its directories. */
async function emptyAndRemove(procs: string, dirs: string[]): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const pids = read(procs).split('\n').filter(Boolean).map(Number);
    if (pids.length === 0) break;
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch { /* already gone */ }
    }
    await sleep(20);
  }
  for (const dir of dirs) rmdirSync(dir);
}

const read = (file: string) => readFileSync(file, 'utf8').trim();

/** Two fields of a memory.stat file, in bytes (NaN where missing). */
function statOf(file: string, anon: string, mapped: string): { anonBytes: number; mappedBytes: number } {
  const text = read(file);
  const field = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, 'm').exec(text)?.[1] ?? NaN);
  return { anonBytes: field(anon), mappedBytes: field(mapped) };
}

/** The peak resident size of the processes listed in a cgroup.procs file, summed; NaN when none is left. */
function peakRss(procs: string): number {
  const kib = read(procs).split('\n').filter(Boolean).map((pid) => {
    try {
      return Number(/^VmHWM:\s+(\d+) kB/m.exec(read(`/proc/${pid}/status`))?.[1] ?? 0);
    } catch {
      return 0; // gone since the list was read
    }
  });
  return kib.length === 0 ? NaN : kib.reduce((a, b) => a + b, 0) * 1024;
}

export function makeGroup(name: string, limits: Limits): Group {
  const periodUs = 100_000;
  const quotaUs = Math.round((periodUs * limits.cpuMillis) / 1000);
  if (existsSync('/sys/fs/cgroup/cgroup.controllers')) {
    const dir = `/sys/fs/cgroup/${name}`;
    mkdirSync(dir);
    writeFileSync(`${dir}/memory.max`, String(limits.memoryBytes));
    if (existsSync(`${dir}/memory.swap.max`)) writeFileSync(`${dir}/memory.swap.max`, '0');
    writeFileSync(`${dir}/cpu.max`, `${quotaUs} ${periodUs}`);
    return {
      procs: [`${dir}/cgroup.procs`],
      peakBytes: () => (existsSync(`${dir}/memory.peak`) ? Number(read(`${dir}/memory.peak`)) : NaN),
      peakRssBytes: () => peakRss(`${dir}/cgroup.procs`),
      oomKills: () => Number(/oom_kill (\d+)/.exec(read(`${dir}/memory.events`))?.[1] ?? 0),
      memoryNow: () => statOf(`${dir}/memory.stat`, 'anon', 'file_mapped'),
      remove: () => emptyAndRemove(`${dir}/cgroup.procs`, [dir]),
    };
  }
  const mem = `/sys/fs/cgroup/memory/${name}`;
  const cpu = `/sys/fs/cgroup/cpu/${name}`;
  mkdirSync(mem);
  mkdirSync(cpu);
  writeFileSync(`${mem}/memory.limit_in_bytes`, String(limits.memoryBytes));
  // No swap to hide in, as in a pod.
  if (existsSync(`${mem}/memory.memsw.limit_in_bytes`)) {
    writeFileSync(`${mem}/memory.memsw.limit_in_bytes`, String(limits.memoryBytes));
  }
  writeFileSync(`${cpu}/cpu.cfs_period_us`, String(periodUs));
  writeFileSync(`${cpu}/cpu.cfs_quota_us`, String(quotaUs));
  return {
    procs: [`${mem}/cgroup.procs`, `${cpu}/cgroup.procs`],
    peakBytes: () => Number(read(`${mem}/memory.max_usage_in_bytes`)),
    peakRssBytes: () => peakRss(`${mem}/cgroup.procs`),
    oomKills: () => Number(/oom_kill (\d+)/.exec(read(`${mem}/memory.oom_control`))?.[1] ?? 0),
    memoryNow: () => statOf(`${mem}/memory.stat`, 'total_rss', 'total_mapped_file'),
    remove: () => emptyAndRemove(`${mem}/cgroup.procs`, [mem, cpu]),
  };
}

/** Why no group can be made here, or undefined when one can. */
export async function cannotMakeGroups(limits: Limits): Promise<string | undefined> {
  if (process.getuid?.() !== 0) return 'not root';
  try {
    await makeGroup(`ambassador-probe-${process.pid}`, limits).remove();
    return undefined;
  } catch (err) {
    return (err as Error).message;
  }
}

// ---------------------------------------------------------------------------------------------------------
// A cold start: the artifact's own pages charged to its group, as in a pod.
// ---------------------------------------------------------------------------------------------------------

/** Drops a file's pages from the page cache (GNU dd: iflag=nocache with count=0 asks it for the whole file).
 * The kernel keeps the pages another process has mapped. */
export function evict(file: string): void {
  spawnSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/**
 * A copy of an executable, under `dir` with its own name, that no other process maps and none of whose pages
 * are in the page cache. Started from it inside a group, a process reads the code it runs into that group, as
 * a container does on its first start from its image. Evicting the original is not enough while other
 * processes run it (a test beside this one, a shell): the pages they map stay cached and are charged to
 * them, and a runtime of 100 MB and more then looks able to start in less memory than it needs.
 */
export function coldCopy(file: string, dir: string): string {
  const copy = path.join(dir, 'cold', path.basename(file));
  mkdirSync(path.dirname(copy), { recursive: true });
  const dd = spawnSync('dd', [`if=${file}`, `of=${copy}`, 'bs=4M', 'conv=fsync', 'status=none'], {
    encoding: 'utf8',
  });
  if (dd.status !== 0) throw new Error(`cannot copy ${file} to ${copy}: ${dd.stderr || dd.error}`);
  chmodSync(copy, 0o755);
  evict(copy); // written and flushed, so clean: every page goes
  return copy;
}
