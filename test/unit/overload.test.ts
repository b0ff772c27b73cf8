/** The memory limit the process runs under, read from its cgroup as each runtime's readFile sees it (a
 * table of files stands in for /proc and /sys), and the guard that sheds new requests near it. */
import { describe, expect, it } from 'vitest';
import { cgroupMemory, MemoryGuard, processPlaces } from '../../ambassador.ts';

/** The limit, as `cgroupMemory` finds it. */
const cgroupMemoryLimit = (readFile: (path: string) => string) => cgroupMemory(readFile)?.limitBytes ?? null;

/** A readFile over a table of files; any other path is missing, as a real one would be. */
const files = (table: Record<string, string>) => (path: string) => {
  if (!(path in table)) throw Object.assign(new Error(`ENOENT: ${path}`), { code: 'ENOENT' });
  return table[path];
};

describe('cgroupMemory', () => {
  it('reads cgroup v2 as a container sees it (its own group at the root) and as a host sees it (a path)', () => {
    expect(cgroupMemoryLimit(files({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': '67108864\n' })))
      .toBe(64 * 1024 ** 2);
    expect(cgroupMemoryLimit(files({
      '/proc/self/cgroup': '0::/kubepods/pod-1/ambassador\n',
      '/sys/fs/cgroup/kubepods/pod-1/ambassador/memory.max': '134217728',
    }))).toBe(128 * 1024 ** 2);
    expect(cgroupMemoryLimit(files({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': 'max\n' })))
      .toBeNull();
  });

  it('reads cgroup v1\'s memory hierarchy, and takes its "no limit" (a number near 2^63) for none', () => {
    const groups = '12:pids:/x\n4:memory:/ambassador-test\n3:cpu,cpuacct:/ambassador-test\n1:name=systemd:/\n';
    expect(cgroupMemoryLimit(files({
      '/proc/self/cgroup': groups,
      '/sys/fs/cgroup/memory/ambassador-test/memory.limit_in_bytes': '67108864\n',
    }))).toBe(64 * 1024 ** 2);
    expect(cgroupMemoryLimit(files({
      '/proc/self/cgroup': groups,
      '/sys/fs/cgroup/memory/ambassador-test/memory.limit_in_bytes': '9223372036854771712\n',
    }))).toBeNull();
    // A container's own namespace: its group is the hierarchy's root.
    expect(cgroupMemoryLimit(files({
      '/proc/self/cgroup': '4:memory:/\n',
      '/sys/fs/cgroup/memory/memory.limit_in_bytes': '268435456',
    }))).toBe(256 * 1024 ** 2);
  });

  it("reads a container's own group at the root when /proc/self cannot be read (Deno without --allow-all)", () => {
    expect(cgroupMemoryLimit(files({ '/sys/fs/cgroup/memory.max': '67108864' }))).toBe(64 * 1024 ** 2);
    expect(cgroupMemoryLimit(files({ '/sys/fs/cgroup/memory/memory.limit_in_bytes': '67108864' }))).toBe(
      64 * 1024 ** 2,
    );
  });

  it("counts the group's anonymous memory, what the kernel cannot take back (v2 anon, v1 total_rss)", () => {
    const v2 = cgroupMemory(files({
      '/proc/self/cgroup': '0::/\n',
      '/sys/fs/cgroup/memory.max': '67108864',
      '/sys/fs/cgroup/memory.stat': 'anon 30000000\nfile 20000000\nactive_file 8000000\ninactive_file 12000000\n',
    }));
    expect(v2?.used()).toBe(30_000_000);
    const v1 = cgroupMemory(files({
      '/proc/self/cgroup': '4:memory:/g\n',
      '/sys/fs/cgroup/memory/g/memory.limit_in_bytes': '67108864',
      '/sys/fs/cgroup/memory/g/memory.stat':
        'cache 20000000\nrss 1\nrss_huge 0\ntotal_cache 20000000\ntotal_rss 35000000\n',
    }));
    expect(v1?.used()).toBe(35_000_000);
    // Nothing to read: the reading fails, and the guard keeps its last one.
    expect(() => cgroupMemory(files({ '/sys/fs/cgroup/memory.max': '100' }))?.used()).toThrow();
  });

  it('is null where nothing can be read: no /proc, no memory controller, no limit file', () => {
    expect(cgroupMemoryLimit(files({}))).toBeNull();
    expect(cgroupMemoryLimit(files({ '/proc/self/cgroup': '9:pids:/\n1:name=systemd:/\n' }))).toBeNull();
    expect(cgroupMemoryLimit(files({ '/proc/self/cgroup': '0::/lost\n' }))).toBeNull();
  });
});

describe('MemoryGuard', () => {
  it('sheds from the threshold on and stops below it, telling each change once', () => {
    const changes: boolean[] = [];
    const guard = new MemoryGuard(100 * 1024 ** 2, 90);
    const mib = (n: number) => n * 1024 ** 2;
    for (const rss of [50, 89, 90, 95, 120, 91, 89.9, 10]) guard.update(mib(rss), (s) => changes.push(s));
    expect(changes).toEqual([true, false]);
    expect(guard.shedding).toBe(false);
    guard.update(mib(90), (s) => changes.push(s));
    expect(guard.shedding).toBe(true);
  });

  it('never sheds without a limit, or with MEMORY_SHED_PERCENT=0', () => {
    for (const guard of [new MemoryGuard(null, 90), new MemoryGuard(1024, 0)]) {
      guard.update(Number.MAX_SAFE_INTEGER, () => {
        throw new Error('no change expected');
      });
      expect(guard.shedding).toBe(false);
    }
  });
});

describe('processPlaces (PROCESS_MAX_IN_FLIGHT)', () => {
  it('is one per 4 MiB of the memory limit when unset, at least 4, and none without a limit', () => {
    expect(processPlaces(null, 128 * 1024 ** 2)).toBe(32);
    expect(processPlaces(null, 64 * 1024 ** 2)).toBe(16);
    expect(processPlaces(null, 1024 ** 3 + 3 * 1024 ** 2)).toBe(256);
    expect(processPlaces(null, 8 * 1024 ** 2)).toBe(4);
    expect(processPlaces(null, null)).toBe(0);
  });

  it('is what it is set to, 0 (no limit) included, whatever the memory limit', () => {
    expect(processPlaces(5, 128 * 1024 ** 2)).toBe(5);
    expect(processPlaces(0, 128 * 1024 ** 2)).toBe(0);
    expect(processPlaces(100, null)).toBe(100);
  });
});
