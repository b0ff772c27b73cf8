/** The memory limit the process runs under, read from its cgroup as each runtime's readFile sees it (a
 * table of files stands in for /proc and /sys), and the guard that sheds new requests near it. */
import { describe, expect, it } from 'vitest';
import { cgroupCpu, cgroupMemory, cgroupRefused, MemoryGuard, processPlaces } from '../../ambassador.ts';

/** The limits, as `cgroupMemory` and `cgroupCpu` find them. */
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

describe('cgroupRefused', () => {
  it('tells a runtime that refuses the read (Deno without --allow-all) from a system without cgroups', () => {
    const refusing = (name: string) => () => {
      throw Object.assign(new Error('Requires all access to "/proc/self/cgroup"'), { name });
    };
    expect(cgroupRefused(refusing('NotCapable'))).toBe('Requires all access to "/proc/self/cgroup"');
    expect(cgroupRefused(refusing('PermissionDenied'))).toMatch(/Requires all access/);
    expect(cgroupRefused(files({}))).toBeUndefined(); // no /proc: nothing refused, nothing to tell
    expect(cgroupRefused(files({ '/proc/self/cgroup': '0::/\n' }))).toBeUndefined();
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

describe('cgroupCpu', () => {
  it('reads cgroup v2 cpu.max (quota and period) as a container and as a host sees it, and "max" for none', () => {
    expect(cgroupCpu(files({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/cpu.max': '10000 100000\n' }))).toBe(0.1);
    expect(cgroupCpu(files({
      '/proc/self/cgroup': '0::/kubepods/pod-1/ambassador\n',
      '/sys/fs/cgroup/kubepods/pod-1/ambassador/cpu.max': '50000 100000',
    }))).toBe(0.5);
    expect(cgroupCpu(files({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/cpu.max': 'max 100000\n' }))).toBeNull();
  });

  it("reads cgroup v1's quota over its period, in the hierarchy named by the controllers it shares, -1 for none", () => {
    const groups = '12:pids:/x\n4:memory:/ambassador-test\n3:cpu,cpuacct:/ambassador-test\n1:name=systemd:/\n';
    const v1 = (quota: string) =>
      files({
        '/proc/self/cgroup': groups,
        '/sys/fs/cgroup/cpu,cpuacct/ambassador-test/cpu.cfs_quota_us': quota,
        '/sys/fs/cgroup/cpu,cpuacct/ambassador-test/cpu.cfs_period_us': '100000\n',
      });
    expect(cgroupCpu(v1('20000\n'))).toBe(0.2);
    expect(cgroupCpu(v1('-1\n'))).toBeNull();
    // A hierarchy of its own, as on this kind of host: /sys/fs/cgroup/cpu.
    expect(cgroupCpu(files({
      '/proc/self/cgroup': '2:cpuacct:/\n1:cpu:/g\n',
      '/sys/fs/cgroup/cpu/g/cpu.cfs_quota_us': '150000',
      '/sys/fs/cgroup/cpu/g/cpu.cfs_period_us': '100000',
    }))).toBe(1.5);
  });

  it("reads a container's own group at the root when /proc/self cannot be read, and is null where nothing is", () => {
    expect(cgroupCpu(files({ '/sys/fs/cgroup/cpu.max': '25000 50000' }))).toBe(0.5);
    expect(cgroupCpu(files({
      '/sys/fs/cgroup/cpu/cpu.cfs_quota_us': '10000',
      '/sys/fs/cgroup/cpu/cpu.cfs_period_us': '100000',
    }))).toBe(0.1);
    expect(cgroupCpu(files({}))).toBeNull();
    expect(cgroupCpu(files({ '/proc/self/cgroup': '9:pids:/\n1:name=systemd:/\n' }))).toBeNull();
    expect(cgroupCpu(files({ '/proc/self/cgroup': '0::/lost\n' }))).toBeNull();
  });
});

describe('processPlaces (PROCESS_MAX_IN_FLIGHT)', () => {
  it('is one per 4 MiB of the memory limit when unset, at least 4, and none without a limit', () => {
    expect(processPlaces(null, 128 * 1024 ** 2, null)).toBe(32);
    expect(processPlaces(null, 64 * 1024 ** 2, null)).toBe(16);
    expect(processPlaces(null, 1024 ** 3 + 3 * 1024 ** 2, null)).toBe(256);
    expect(processPlaces(null, 8 * 1024 ** 2, null)).toBe(4);
    expect(processPlaces(null, null, null)).toBe(0);
  });

  it('is one per 3 ms of CPU a second of the CPU limit, the fewer of the two when both are set', () => {
    expect(processPlaces(null, null, 0.1)).toBe(33);
    expect(processPlaces(null, null, 0.02)).toBe(6);
    expect(processPlaces(null, null, 0.005)).toBe(4); // at least 4
    expect(processPlaces(null, null, 2)).toBe(666);
    expect(processPlaces(null, 128 * 1024 ** 2, 0.1)).toBe(32); // the manifests' limits: the memory's
    expect(processPlaces(null, 128 * 1024 ** 2, 0.05)).toBe(16); // half the CPU: the CPU's
    expect(processPlaces(null, 512 * 1024 ** 2, 1)).toBe(128);
  });

  it('is what it is set to, 0 (no limit) included, whatever the limits', () => {
    expect(processPlaces(5, 128 * 1024 ** 2, 0.1)).toBe(5);
    expect(processPlaces(0, 128 * 1024 ** 2, 0.02)).toBe(0);
    expect(processPlaces(100, null, null)).toBe(100);
  });
});
