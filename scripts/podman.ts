/** Podman with a configuration and storage of its own, under one folder. Some hosts need it: hybrid
 * cgroups (runc works where crun does not) and no permission to raise rlimits (so explicit ulimits). */
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

/** Writes containers.conf and storage.conf under `dir`; returns the environment that points podman at them. */
export function privatePodmanEnv(dir: string): Record<string, string> {
  mkdirSync(dir, { recursive: true });
  writeFileSync(path.join(dir, 'containers.conf'), [
    '[containers]', 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]',
    '[network]', 'network_backend = "netavark"', `network_config_dir = "${dir}/networks"`,
    '[engine]', 'runtime = "runc"', `tmp_dir = "${dir}/libpod-tmp"`, '',
  ].join('\n'));
  writeFileSync(path.join(dir, 'storage.conf'), [
    '[storage]', 'driver = "overlay"', `graphroot = "${dir}/storage"`, `runroot = "${dir}/runroot"`, '',
  ].join('\n'));
  return { CONTAINERS_CONF: path.join(dir, 'containers.conf'), CONTAINERS_STORAGE_CONF: path.join(dir, 'storage.conf') };
}
