/** Service discovery by each runtime artifact's own resolver: a name from the hosts file, resolved to its
 * address (the policy with a resolver the test controls: test/unit/discovery.test.ts). */
import { describe, expect, it } from 'vitest';
import { ARTIFACTS, scrape, startAmbassador, startUpstream, stopAfterEach } from './helpers.ts';

describe.each(ARTIFACTS)("discovery by the runtime's own resolver (%s)", (runtime) => {
  stopAfterEach();

  it("resolves the upstream's name to its address, shown as the endpoint in /metrics, and keeps the name in Host", async () => {
    const up = await startUpstream();
    const amb = await startAmbassador(runtime, { UPSTREAM_URL: `http://localhost:${up.port}` });
    for (let i = 0; i < 5; i++) expect((await fetch(`${amb.url}/x`)).status).toBe(200);
    const m = await scrape(amb);
    expect(m.get(`ambassador_upstream_endpoint_requests_total{route="default",endpoint="127.0.0.1:${up.port}"}`))
      .toBeGreaterThanOrEqual(5);
    expect(up.seen.every((s) => s.headers.host === `localhost:${up.port}`)).toBe(true);
  });
});
