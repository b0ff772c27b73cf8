/** The Kubernetes manifests: valid against the Kubernetes API schema (kubernetes-models, generated from
 * the API's OpenAPI definitions), and holding the rules a sidecar needs. */
import { readFileSync } from 'node:fs';
import { ConfigMap } from 'kubernetes-models/v1/ConfigMap';
import { Service } from 'kubernetes-models/v1/Service';
import { loadConfig } from '../../ambassador.ts';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { describe, expect, it } from 'vitest';
import { kustomization, objects, readYaml } from '../manifests.ts';

const all = objects();
const deployments = all.filter((o) => o.object.kind === 'Deployment').map((o) => o.object);
const order = deployments.find((d) => d.metadata.name === 'order-service')!;
type Container = {
  name: string;
  image: string;
  restartPolicy?: string;
  env?: Array<{ name: string; value: string; valueFrom?: { resourceFieldRef?: Record<string, string> } }>;
  securityContext?: any;
  resources?: any;
  startupProbe?: any;
  readinessProbe?: any;
  livenessProbe?: any;
  ports?: Array<{ name?: string; containerPort: number }>;
}; // eslint-disable-line @typescript-eslint/no-explicit-any
const containersOf = (
  d: typeof order,
): Container[] => [...(d.spec.template.spec.initContainers ?? []), ...d.spec.template.spec.containers];

describe('Kubernetes manifests', () => {
  it.each(all.map((o) => [`${o.file}: ${o.object.kind} ${o.object.metadata.name}`, o.object] as const))(
    '%s validates against the API schema',
    (_name, object) => {
      const model = object.kind === 'Deployment'
        ? new Deployment(object as never)
        : object.kind === 'Service'
        ? new Service(object as never)
        : undefined;
      expect(model, `no schema model for kind ${object.kind}`).toBeDefined();
      expect(() => model!.validate()).not.toThrow();
    },
  );

  it('the schema check is real: a port that is not a number fails it', () => {
    const broken = structuredClone(order);
    broken.spec.template.spec.containers[0].ports[0].containerPort = 'three thousand';
    expect(() => new Deployment(broken as never).validate()).toThrow();
  });

  it('runs the ambassador as a native sidecar whose probes hit the admin port, never an upstream path', () => {
    const sidecar = (order.spec.template.spec.initContainers as Container[]).find((c) => c.name === 'ambassador')!;
    expect(sidecar.restartPolicy).toBe('Always');
    const admin = sidecar.ports!.find((p) => p.name === 'admin')!.containerPort;
    expect(admin).toBe(9901);
    expect(sidecar.startupProbe.httpGet).toEqual({ path: '/readyz', port: 'admin' });
    expect(sidecar.readinessProbe.httpGet).toEqual({ path: '/readyz', port: 'admin' });
    expect(sidecar.livenessProbe.httpGet).toEqual({ path: '/healthz', port: 'admin' });
    expect(order.spec.template.spec.containers.map((c: Container) => c.name)).toEqual(['order-service']);
  });

  it('gives every pod and container the restricted security context', () => {
    for (const d of deployments) {
      const pod = d.spec.template.spec.securityContext;
      expect(pod, d.metadata.name).toMatchObject({ runAsNonRoot: true, seccompProfile: { type: 'RuntimeDefault' } });
      expect(pod.runAsUser).toBeGreaterThan(0);
      for (const c of containersOf(d)) {
        expect(c.securityContext, `${d.metadata.name}/${c.name}`).toEqual({
          allowPrivilegeEscalation: false,
          readOnlyRootFilesystem: true,
          capabilities: { drop: ['ALL'] },
        });
      }
    }
  });

  it("keeps the ambassador within the article's CPU (100m) and the memory its image starts in (128Mi)", () => {
    const sidecar = containersOf(order).find((c) => c.name === 'ambassador')!;
    expect(sidecar.resources.limits).toEqual({ cpu: '100m', memory: '128Mi' });
  });

  it('tells the ambassador its own limits, in the units it reads them in (bytes, millicores)', () => {
    const sidecar = containersOf(order).find((c) => c.name === 'ambassador')!;
    const from = (name: string) => sidecar.env!.find((e) => e.name === name)?.valueFrom?.resourceFieldRef;
    expect(from('MEMORY_LIMIT_BYTES')).toEqual({ resource: 'limits.memory' });
    expect(from('CPU_LIMIT_MILLICORES')).toEqual({ resource: 'limits.cpu', divisor: '1m' });
  });

  it('gives the drain time to finish inside the grace period', () => {
    const sidecar = containersOf(order).find((c) => c.name === 'ambassador')!;
    const drainMs = Number(sidecar.env!.find((e) => e.name === 'DRAIN_TIMEOUT_MS')!.value);
    expect(order.spec.template.spec.terminationGracePeriodSeconds * 1000).toBeGreaterThan(drainMs);
  });

  it('sets every image in one place, the kustomization', () => {
    const names = new Set(kustomization().images.map((i) => i.name));
    for (const d of deployments) {
      for (const c of containersOf(d)) {
        expect(names.has(c.image), `${c.image} is not in kustomization.yaml`).toBe(true);
      }
    }
  });

  it('runs the ambassador image that scripts/images.ts tags latest', () => {
    const tag = kustomization().images.find((i) => i.name === 'ambassador')?.newTag;
    const latest = /podman\('tag', `\$\{registry\}\/ambassador:(\w+)`, `\$\{registry\}\/ambassador:latest`\)/.exec(
      readFileSync(new URL('../../scripts/images.ts', import.meta.url), 'utf8'),
    )?.[1];
    expect(latest).toBeDefined();
    expect(tag).toBe(latest);
  });

  it('points the app at the ambassador and the ambassador at the inventory Service', () => {
    const app = containersOf(order).find((c) => c.name === 'order-service')!;
    expect(app.env).toContainEqual({ name: 'AMBASSADOR_URL', value: 'http://127.0.0.1:8080' });
    const sidecar = containersOf(order).find((c) => c.name === 'ambassador')!;
    const upstream = new URL(sidecar.env!.find((e) => e.name === 'UPSTREAM_URL')!.value);
    const service =
      all.find((o) => o.object.kind === 'Service' && o.object.metadata.name === upstream.hostname)!.object;
    expect(service.spec.ports[0].port).toBe(Number(upstream.port));
  });

  describe('the routes example (examples/routes-configmap.yaml)', () => {
    const configMap = readYaml('examples/routes-configmap.yaml')[0] as { kind: string; data: Record<string, string> };

    it('validates against the API schema', () => {
      expect(() => new ConfigMap(configMap as never).validate()).not.toThrow();
    });

    it('holds a routes file the ambassador accepts, with the mTLS files where the Secret is mounted', () => {
      const read = (file: string) => {
        if (file.startsWith('/etc/ambassador/payments-tls/')) {
          return '-----BEGIN CERTIFICATE-----\n(mounted from the Secret)\n';
        }
        if (file === '/etc/ambassador/routes/routes.json') return configMap.data['routes.json'];
        throw new Error(`ENOENT: ${file}`);
      };
      const config = loadConfig({ ROUTES_FILE: '/etc/ambassador/routes/routes.json' }, read);
      expect(config.routes.map((r) => [r.name, r.prefix, r.upstreams[0].href])).toEqual([
        ['inventory', '/inventory', 'http://inventory-service:9000/'],
        ['payments', '/payments', 'https://payments-service:9443/'],
      ]);
      const payments = config.routes.find((r) => r.name === 'payments')!;
      expect(payments.retryAttempts).toBe(1);
      expect(payments.tls).toEqual({
        caFile: '/etc/ambassador/payments-tls/ca.crt',
        certFile: '/etc/ambassador/payments-tls/tls.crt',
        keyFile: '/etc/ambassador/payments-tls/tls.key',
        serverName: null,
        minVersion: 'TLSv1.2',
      });
      // The inventory route points at the Service the kustomization deploys.
      const service =
        all.find((o) => o.object.kind === 'Service' && o.object.metadata.name === 'inventory-service')!.object;
      expect(service.spec.ports[0].port).toBe(Number(config.routes[0].upstreams[0].port));
    });
  });
});
