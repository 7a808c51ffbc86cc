// TCP timeouts in the translated snapshot (issue 3): Envoy's defaults (idle 1 h, connect 10 s)
// when nothing sets them, and DestinationRule connectionPool.tcp.connectTimeout per cluster.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseText } from '../../../src/config/load.js';
import type { TcpProxy } from '../../../src/model/snapshot.js';
import { translate } from '../../../src/model/translate/index.js';

const CONFIG = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - {port: {number: 9000, name: tcp, protocol: TCP}, hosts: ["*"]}
  - port: {number: 9443, name: pass, protocol: TLS}
    hosts: [pass.example.com]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: 9000}]
    route: [{destination: {host: db.local, port: {number: 5432}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: [pass.example.com]
  gateways: [gw]
  tls:
  - match: [{port: 9443, sniHosts: [pass.example.com]}]
    route: [{destination: {host: web.local, port: {number: 8443}}}]
`;

const DR = `---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db.local
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms}
`;

const SERVER_9000 = '  - {port: {number: 9000, name: tcp, protocol: TCP}, hosts: ["*"]}';

/** Config text (CONFIG first) with a second TCP server, 9001, whose route goes to db.local's subset v1. */
function withSubsetRoute(yaml: string): string {
  return yaml.replace(SERVER_9000, `${SERVER_9000}\n  - {port: {number: 9001, name: tcp2, protocol: TCP}, hosts: ["*"]}`) + `---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp2}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: 9001}]
    route: [{destination: {host: db.local, subset: v1, port: {number: 5432}}}]
`;
}

function tr(yaml: string, opts: Parameters<typeof translate>[1] = {}) {
  const parsed = parseText(yaml, 'test.yaml');
  const r = translate(parsed.resources, opts);
  assert.deepEqual([...parsed.diagnostics, ...r.diagnostics].filter((d) => d.severity === 'error'), []);
  const proxies = r.snapshot.listeners.flatMap((l) => l.filterChains).map((c) => c.filter).filter((f): f is TcpProxy => f.kind === 'tcp');
  return { snapshot: r.snapshot, proxies };
}

test('defaults: TCP and passthrough proxies idle out after 1 h, clusters connect within 10 s', () => {
  const { snapshot, proxies } = tr(CONFIG);
  assert.equal(proxies.length, 2, 'one TCP proxy per route (TCP and passthrough)');
  for (const p of proxies) assert.equal(p.idleTimeoutMs, 3_600_000, p.name);
  const clusters = Object.values(snapshot.clusters);
  assert.deepEqual(clusters.map((c) => c.serviceHost).sort(), ['db.local', 'web.local']);
  for (const c of clusters) assert.equal(c.connectTimeoutMs, 10_000, c.name);
});

test('DestinationRule connectionPool.tcp.connectTimeout sets the connect timeout of its host only', () => {
  const { snapshot } = tr(CONFIG + DR);
  const by = Object.fromEntries(Object.values(snapshot.clusters).map((c) => [c.serviceHost, c.connectTimeoutMs]));
  assert.deepEqual(by, { 'db.local': 250, 'web.local': 10_000 });
});

test('the translate option tcpIdleTimeoutMs reaches every TCP proxy', () => {
  const { proxies } = tr(CONFIG, { tcpIdleTimeoutMs: 1_000 });
  assert.deepEqual(proxies.map((p) => p.idleTimeoutMs), [1_000, 1_000]);
});

test('DestinationRule connectionPool.tcp.idleTimeout sets the TCP idle timeout of its host; 0s disables it', () => {
  const withIdle = (v: string) => CONFIG + DR.replace('connectTimeout: 250ms', `connectTimeout: 250ms, idleTimeout: ${v}`);
  const idleOf = (cfg: string) => Object.fromEntries(Object.values(tr(cfg).snapshot.clusters).map((c) => [c.serviceHost, c.limits.tcpIdleTimeoutMs]));
  assert.deepEqual(idleOf(withIdle('90s')), { 'db.local': 90_000, 'web.local': undefined });
  assert.deepEqual(idleOf(withIdle('0s')), { 'db.local': 0, 'web.local': undefined });
});

test('DestinationRule connectionPool.tcp.tcpKeepalive: whole seconds and probes for its host only; none by default; a subset replaces it', () => {
  const withKa = (v: string) => CONFIG + DR.replace('connectTimeout: 250ms', `connectTimeout: 250ms, tcpKeepalive: ${v}`);
  const kaOf = (cfg: string) => Object.fromEntries(Object.values(tr(cfg).snapshot.clusters).map((c) => [c.name, c.tcpKeepalive]));
  const db = 'outbound|5432||db.local';
  const web = 'outbound|8443||web.local';
  assert.deepEqual(kaOf(CONFIG), { [db]: undefined, [web]: undefined });
  assert.deepEqual(kaOf(withKa('{time: 30s, interval: 5s, probes: 3}')), { [db]: { timeS: 30, intervalS: 5, probes: 3 }, [web]: undefined });
  // As Istio hands Envoy: the fraction of a second is dropped; probes 0 is unset; {} turns it on with the OS's values.
  assert.deepEqual(kaOf(withKa('{time: 1.9s, interval: 2m, probes: 0}'))[db], { timeS: 1, intervalS: 120 });
  assert.deepEqual(kaOf(withKa('{}'))[db], {});
  const got = kaOf(withSubsetRoute(withKa('{time: 30s}') + `  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {probes: 5}}}}
`));
  assert.deepEqual([got[db], got['outbound|5432|v1|db.local']], [{ timeS: 30 }, { probes: 5 }]);
});

test('tcpKeepalive values the kernel cannot take are errors at their line, with the range', () => {
  for (const [v, field, what] of [
    ['{time: 500ms}', 'time', 'whole seconds from 1s to 32767s'],
    ['{interval: 10h}', 'interval', 'whole seconds from 1s to 32767s'],
    ['{probes: 128}', 'probes', '1 to 127'],
  ] as const) {
    const parsed = parseText(CONFIG + DR.replace('connectTimeout: 250ms', `connectTimeout: 250ms, tcpKeepalive: ${v}`), 'test.yaml');
    const errs = translate(parsed.resources, {}).diagnostics.filter((d) => d.severity === 'error');
    assert.equal(errs.length, 1, v);
    assert.equal(errs[0]!.code, 'TG2005');
    assert.match(errs[0]!.message, new RegExp(what.replace(/[()]/g, '\\$&')), v);
    assert.match(String(errs[0]!.path), new RegExp(`connectionPool\\.tcp\\.tcpKeepalive\\.${field}$`), v);
    assert.ok((errs[0]!.location?.line ?? 0) > 0, `${v}: a line`);
    const c = Object.values(translate(parsed.resources, {}).snapshot.clusters).find((x) => x.serviceHost === 'db.local');
    assert.equal(c?.tcpKeepalive, undefined, `${v}: not half applied`);
  }
});

test('durations take Go\'s form with several parts, as the schema does: 1m30s, 1h30m, 1.5s', () => {
  const withPool = (v: string) => CONFIG + DR.replace('connectTimeout: 250ms', v);
  const db = (cfg: string) => Object.values(tr(cfg).snapshot.clusters).find((c) => c.serviceHost === 'db.local')!;
  assert.equal(db(withPool('connectTimeout: 1m30s')).connectTimeoutMs, 90_000);
  assert.equal(db(withPool('connectTimeout: 1.5s')).connectTimeoutMs, 1_500);
  assert.equal(db(withPool('idleTimeout: 1h30m')).limits.tcpIdleTimeoutMs, 5_400_000);
  assert.equal(db(withPool('connectTimeout: 1s500ms')).connectTimeoutMs, 1_500);
  assert.deepEqual(db(withPool('tcpKeepalive: {time: 2m30s}')).tcpKeepalive, { timeS: 150 });
});

test('a DestinationRule no route uses still gets its values checked, each bad value once at its line', () => {
  const unused = `---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: unused}
spec:
  host: nothing.local
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 0s}
    portLevelSettings:
    - port: {number: 80}
      connectionPool: {tcp: {tcpKeepalive: {probes: 200}}}
  subsets:
  - name: v1
    trafficPolicy:
      connectionPool: {tcp: {tcpKeepalive: {time: 500ms}, connectTimeout: 0ms}}
`;
  const parsed = parseText(CONFIG + unused, 'test.yaml');
  const errs = [...parsed.diagnostics, ...translate(parsed.resources, {}).diagnostics].filter((d) => d.severity === 'error');
  assert.deepEqual(errs.map((d) => [d.code, d.path]).sort(), [
    ['TG2005', 'spec.subsets[0].trafficPolicy.connectionPool.tcp.connectTimeout'],
    ['TG2005', 'spec.subsets[0].trafficPolicy.connectionPool.tcp.tcpKeepalive.time'],
    ['TG2005', 'spec.trafficPolicy.connectionPool.tcp.connectTimeout'],
    ['TG2005', 'spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.tcpKeepalive.probes'],
  ]);
  for (const e of errs) assert.ok((e.location?.line ?? 0) > 0, `${e.path}: a line`);
});

test('a bad value of a rule two clusters use is reported once', () => {
  const twoSubsets = withSubsetRoute(CONFIG + DR.replace('connectTimeout: 250ms', 'connectTimeout: 250ms, tcpKeepalive: {interval: 100000s}') + `  subsets:
  - {name: v1, labels: {version: v1}}
`);
  const parsed = parseText(twoSubsets, 'test.yaml');
  const r = translate(parsed.resources, {});
  const errs = r.diagnostics.filter((d) => d.severity === 'error');
  assert.deepEqual(errs.map((d) => d.path), ['spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.interval']);
  // Both clusters took the rule's good values and none of the bad keep-alive.
  const dbs = Object.values(r.snapshot.clusters).filter((c) => c.serviceHost === 'db.local');
  assert.deepEqual(dbs.map((c) => [c.connectTimeoutMs, c.tcpKeepalive]), [[250, undefined], [250, undefined]]);
});
