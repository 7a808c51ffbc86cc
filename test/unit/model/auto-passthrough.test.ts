// AUTO_PASSTHROUGH translation: SNI `outbound_.<port>_.<subset>_.<host>` chains for mesh-internal
// ServiceEntries covered by the server hosts, Istio's mTLS ALPN, clusters without TLS origination.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { parseText } from '../../../src/config/load.js';
import type { FilterChain, TcpProxy } from '../../../src/model/snapshot.js';
import { autoPassthroughSni, ISTIO_MTLS_ALPN } from '../../../src/model/translate/auto-passthrough.js';
import { translate } from '../../../src/model/translate/index.js';

function tr(yaml: string) {
  const parsed = parseText(yaml, '/cfg/test.yaml');
  assert.deepEqual(parsed.diagnostics.filter((d) => d.severity === 'error'), [], 'fixture must load cleanly');
  return translate(parsed.resources, {});
}

const GATEWAY = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: cross-network-gateway, namespace: istio-system}
spec:
  selector: {istio: eastwestgateway}
  servers:
  - port: {number: 15443, name: tls, protocol: TLS}
    tls: {mode: AUTO_PASSTHROUGH}
    hosts: ["*.local"]
`;

const SERVICES = `
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews.bookinfo.svc.local]
  location: MESH_INTERNAL
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  - {number: 9443, name: tls, protocol: TLS}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews.bookinfo.svc.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: bookinfo}
spec:
  hosts: [api.external.local]
  location: MESH_EXTERNAL
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: bookinfo}
spec:
  hosts: [db.example.com]
  location: MESH_INTERNAL
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.5}]
`;

function chainsOf(yaml: string): FilterChain[] {
  const { snapshot, diagnostics } = tr(yaml);
  assert.deepEqual(diagnostics.filter((d) => d.severity === 'error'), []);
  const l = snapshot.listeners.find((x) => x.port === 15443);
  assert.ok(l, 'listener 15443');
  assert.equal(l.inspector, 'tls-inspector');
  return l.filterChains;
}

describe('AUTO_PASSTHROUGH', () => {
  it('builds the SNI name Istio clients send', () => {
    assert.equal(autoPassthroughSni(9080, '', 'reviews.default.svc.cluster.local'), 'outbound_.9080_._.reviews.default.svc.cluster.local');
    assert.equal(autoPassthroughSni(9080, 'v2', 'reviews.default.svc.cluster.local'), 'outbound_.9080_.v2_.reviews.default.svc.cluster.local');
  });

  it('one chain per port and per DestinationRule subset of each covered mesh-internal service', () => {
    const chains = chainsOf(GATEWAY + SERVICES);
    const names = chains.map((c) => c.match.serverNames).flat().sort();
    assert.deepEqual(names, [
      'outbound_.9080_._.reviews.bookinfo.svc.local',
      'outbound_.9080_.v1_.reviews.bookinfo.svc.local',
      'outbound_.9080_.v2_.reviews.bookinfo.svc.local',
      'outbound_.9443_._.reviews.bookinfo.svc.local',
      'outbound_.9443_.v1_.reviews.bookinfo.svc.local',
      'outbound_.9443_.v2_.reviews.bookinfo.svc.local',
    ]);
    for (const c of chains) {
      assert.equal(c.tls, undefined, 'never terminated');
      assert.equal(c.match.transportProtocol, 'tls');
      assert.deepEqual(c.match.applicationProtocols, [...ISTIO_MTLS_ALPN]);
      assert.equal(c.filter.kind, 'tcp');
    }
    const v2 = chains.find((c) => c.match.serverNames[0] === 'outbound_.9080_.v2_.reviews.bookinfo.svc.local')!;
    const proxy = v2.filter as TcpProxy;
    assert.deepEqual(proxy.clusters.map((w) => w.cluster), ['outbound|9080|v2|reviews.bookinfo.svc.local']);
    assert.equal(proxy.idleTimeoutMs, 3_600_000);
  });

  it('the clusters select subset endpoints and do not originate TLS', () => {
    const { snapshot } = tr(GATEWAY + SERVICES);
    const v2 = snapshot.clusters['outbound|9080|v2|reviews.bookinfo.svc.local'];
    assert.ok(v2);
    assert.deepEqual(v2.endpoints.map((e) => e.address), ['10.0.0.2']);
    assert.equal(v2.tls, undefined);
    const all = snapshot.clusters['outbound|9443||reviews.bookinfo.svc.local'];
    assert.deepEqual(all?.endpoints.map((e) => `${e.address}:${e.port}`).sort(), ['10.0.0.1:9443', '10.0.0.2:9443']);
  });

  it('a DestinationRule that originates TLS gets a plain SNI-DNAT cluster instead', () => {
    const yaml = GATEWAY + SERVICES.replace('  host: reviews.bookinfo.svc.local\n', '  host: reviews.bookinfo.svc.local\n  trafficPolicy: {tls: {mode: SIMPLE}}\n');
    const chains = chainsOf(yaml);
    const { snapshot } = tr(yaml);
    const c = chains.find((x) => x.match.serverNames[0] === 'outbound_.9080_._.reviews.bookinfo.svc.local')!;
    const name = (c.filter as TcpProxy).clusters[0]!.cluster;
    assert.equal(name, 'outbound_.9080_._.reviews.bookinfo.svc.local');
    assert.equal(snapshot.clusters[name]?.tls, undefined);
    assert.equal(snapshot.clusters[name]?.endpoints.length, 2);
  });

  it('skips mesh-external services and hosts outside the server hosts', () => {
    const names = chainsOf(GATEWAY + SERVICES).map((c) => c.match.serverNames[0]);
    assert.ok(!names.some((n) => n?.includes('api.external.local')));
    assert.ok(!names.some((n) => n?.includes('db.example.com')));
  });

  it('namespace-scoped server hosts cover only that namespace', () => {
    const gw = GATEWAY.replace('hosts: ["*.local"]', 'hosts: ["other/*.local"]');
    const { snapshot, diagnostics } = tr(gw + SERVICES);
    assert.equal(snapshot.listeners.length, 0);
    const d = diagnostics.find((x) => x.code === 'TG3025');
    assert.ok(d, 'TG3025 names the empty AUTO_PASSTHROUGH server');
    assert.equal(d.path, 'spec.servers[0].hosts');
  });

  it('is no longer rejected as unsupported', () => {
    const { diagnostics } = tr(GATEWAY + SERVICES);
    assert.equal(diagnostics.find((d) => d.code === 'TG4001'), undefined);
  });
});
