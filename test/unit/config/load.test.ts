import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { loadConfig, parseText } from '../../../src/config/load.js';
import type { Diagnostic } from '../../../src/config/diagnostics.js';

const GATEWAY = `apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: gw
  namespace: edge
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 80
      name: http
      protocol: http
    hosts:
    - "*"
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts:
    - "shop.example.com"
    tls:
      mode: SIMPLE
      credentialName: shop-cert
`;

function codes(ds: Diagnostic[]): string[] {
  return ds.map((d) => `${d.severity} ${d.code}${d.path ? ' ' + d.path : ''}`);
}

function errors(ds: Diagnostic[]): Diagnostic[] {
  return ds.filter((d) => d.severity === 'error');
}

function withTmp(fn: (dir: string) => Promise<void>): () => Promise<void> {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tlsgate-load-'));
    try { await fn(dir); } finally { rmSync(dir, { recursive: true, force: true }); }
  };
}

test('a Gateway parses with namespace, labels and upper-cased protocols', () => {
  const { resources, diagnostics } = parseText(GATEWAY, 'gw.yaml');
  assert.deepEqual(diagnostics, []);
  assert.equal(resources.gateways.length, 1);
  const gw = resources.gateways[0]!;
  assert.equal(gw.metadata.namespace, 'edge');
  assert.equal(gw.metadata.name, 'gw');
  assert.deepEqual(gw.spec.selector, { istio: 'ingressgateway' });
  assert.equal(gw.spec.servers![0]!.port.protocol, 'HTTP');
  assert.equal(gw.spec.servers![1]!.tls!.mode, 'SIMPLE');
  assert.deepEqual(gw.source, { file: 'gw.yaml', line: 1, column: 1 });
});

test('locate maps nested paths to the line and column of the value', () => {
  const gw = parseText(GATEWAY, 'gw.yaml').resources.gateways[0]!;
  assert.deepEqual(gw.locate('spec.servers[1].tls.mode'), { file: 'gw.yaml', line: 20, column: 13 });
  assert.deepEqual(gw.locate('spec.servers[0].port.number'), { file: 'gw.yaml', line: 11, column: 15 });
  assert.deepEqual(gw.locate('spec.servers[1].port.number'), { file: 'gw.yaml', line: 16, column: 20 });
  assert.deepEqual(gw.locate('spec.servers[1].hosts[0]'), { file: 'gw.yaml', line: 18, column: 7 });
  // A block collection is located at its key, the line that names it.
  assert.deepEqual(gw.locate('spec.servers[1].tls'), { file: 'gw.yaml', line: 19, column: 5 });
  // A sequence item that is a map starts at its first key.
  assert.deepEqual(gw.locate('spec.servers[1]'), { file: 'gw.yaml', line: 16, column: 5 });
  // Missing fields fall back to the nearest ancestor that exists, then the document.
  assert.deepEqual(gw.locate('spec.servers[1].tls.caCertificates'), { file: 'gw.yaml', line: 19, column: 5 });
  assert.deepEqual(gw.locate('spec.servers[7].tls'), { file: 'gw.yaml', line: 9, column: 3 });
  assert.deepEqual(gw.locate('nothing.here'), gw.source);
});

test('locate in the second document of a file counts lines from the top of the file', () => {
  const text = `${GATEWAY}---\n${GATEWAY.replace('name: gw', 'name: gw2')}`;
  const { resources } = parseText(text, 'two.yaml');
  assert.equal(resources.gateways.length, 2);
  const second = resources.gateways[1]!;
  assert.deepEqual(second.source, { file: 'two.yaml', line: 23, column: 1 });
  assert.deepEqual(second.locate('spec.servers[1].tls.mode'), { file: 'two.yaml', line: 42, column: 13 });
});

test('each kind parses into its list', () => {
  const text = [
    GATEWAY,
    `apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: vs}
spec:
  hosts: [shop.example.com]
  gateways: [edge/gw]
  http:
  - match: [{uri: {prefix: /api}, headers: {x-user: {exact: a}}, queryParams: {q: {regex: "a.*"}}}]
    route: [{destination: {host: api, subset: v1, port: {number: 8080}}, weight: 100, headers: {request: {set: {x-a: b}}}}]
    rewrite: {uriRegexRewrite: {match: "^/api(.*)", rewrite: "\\\\1"}}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
    timeout: 1m30s
    fault: {abort: {httpStatus: 500, percentage: {value: 10}}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 5.5}
    corsPolicy: {allowOrigins: [{exact: https://a}]}
  - directResponse: {status: 404, body: {string: nope}}
  - redirect: {uri: /new, redirectCode: 308, derivePort: FROM_REQUEST_PORT}
  tls:
  - match: [{sniHosts: [db.example.com], port: 443}]
    route: [{destination: {host: db}}]
  tcp:
  - match: [{port: 5432, destinationSubnets: [10.0.0.0/8]}]
    route: [{destination: {host: db, port: {number: 5432}}, weight: 100}]
`,
    `apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: dr}
spec:
  host: api
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 30ms, tcpKeepalive: {time: 7200s, interval: 75s}}
      http: {http1MaxPendingRequests: 1, h2UpgradePolicy: UPGRADE, idleTimeout: 1h}
    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem, sni: api.example.com, subjectAltNames: [spiffe://x]}
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, credentialName: api-client}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
`,
    `apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: [api.example.com]
  addresses: [192.0.2.1]
  ports: [{number: 443, name: https, protocol: https, targetPort: 8443}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints: [{address: 192.0.2.10, ports: {https: 8443}, labels: {a: b}, weight: 1}]
`,
    `apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm1}
spec: {address: 10.0.0.5, labels: {app: db}, serviceAccount: db, ports: {tcp: 5432}}
`,
    `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}}
`,
    `apiVersion: v1
kind: ConfigMap
metadata: {name: ca}
data: {ca.crt: "-----BEGIN CERTIFICATE-----"}
`,
    `apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata: {name: r}
spec: {parentRefs: [{name: gw}], whatever: [1, 2]}
`,
  ].join('---\n');
  const { resources: r, diagnostics } = parseText(text, 'all.yaml');
  assert.deepEqual(codes(diagnostics), []);
  assert.equal(r.gateways.length, 1);
  assert.equal(r.virtualServices.length, 1);
  assert.equal(r.virtualServices[0]!.spec.http!.length, 3);
  assert.equal(r.destinationRules[0]!.spec.trafficPolicy!.portLevelSettings![0]!.tls!.credentialName, 'api-client');
  assert.equal(r.serviceEntries[0]!.spec.ports![0]!.protocol, 'HTTPS');
  assert.equal(r.workloadEntries[0]!.spec.address, '10.0.0.5');
  assert.equal(r.peerAuthentications[0]!.metadata.namespace, 'istio-system');
  assert.equal(r.configMaps[0]!.data['ca.crt'], '-----BEGIN CERTIFICATE-----');
  // Kinds without a tlsgate schema (UDPRoute) keep their spec as written.
  assert.equal(r.gatewayApi[0]!.kind, 'UDPRoute');
  assert.equal(r.gatewayApi[0]!.group, 'gateway.networking.k8s.io');
  assert.deepEqual(r.gatewayApi[0]!.spec.whatever, [1, 2]);
});

test('an enum error names the field, the line and lists the valid values', () => {
  const { resources, diagnostics } = parseText(GATEWAY.replace('mode: SIMPLE', 'mode: SIMPEL'), 'gw.yaml');
  assert.equal(resources.gateways.length, 0, 'a resource with an error is dropped');
  assert.equal(diagnostics.length, 1);
  const d = diagnostics[0]!;
  assert.equal(d.code, 'TG2003');
  assert.equal(d.severity, 'error');
  assert.equal(d.path, 'spec.servers[1].tls.mode');
  assert.deepEqual(d.location, { file: 'gw.yaml', line: 20, column: 13 });
  assert.deepEqual(d.resource, { kind: 'Gateway', namespace: 'edge', name: 'gw' });
  assert.match(d.message, /"SIMPEL"/);
  assert.equal(d.hint, 'valid values: PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, OPTIONAL_MUTUAL');
});

test('TLS modes are case-sensitive, port protocols are not', () => {
  const { diagnostics } = parseText(GATEWAY.replace('mode: SIMPLE', 'mode: simple'), 'gw.yaml');
  assert.deepEqual(codes(diagnostics), ['error TG2003 spec.servers[1].tls.mode']);
  assert.match(diagnostics[0]!.hint!, /use SIMPLE/);
  const bad = parseText(GATEWAY.replace('protocol: http', 'protocol: smtp'), 'gw.yaml').diagnostics;
  assert.deepEqual(codes(bad), ['error TG2003 spec.servers[0].port.protocol']);
  assert.match(bad[0]!.hint!, /HTTP, HTTPS, GRPC/);
});

test('an unknown field warns, is removed, and the resource is kept', () => {
  const text = GATEWAY.replace('      credentialName: shop-cert', '      credentialName: shop-cert\n      serverCertficate: /x.pem');
  const { resources, diagnostics } = parseText(text, 'gw.yaml');
  assert.deepEqual(codes(diagnostics), ['warning TG2004 spec.servers[1].tls.serverCertficate']);
  assert.equal(diagnostics[0]!.hint, 'did you mean serverCertificate?');
  assert.deepEqual(diagnostics[0]!.location, { file: 'gw.yaml', line: 22, column: 7 });
  const tls = resources.gateways[0]!.spec.servers![1]!.tls as Record<string, unknown>;
  assert.equal('serverCertficate' in tls, false);
  assert.equal(tls.credentialName, 'shop-cert');
});

test('snake_case aliases are renamed to camelCase with a warning', () => {
  const text = GATEWAY.replace('credentialName: shop-cert', 'credential_name: shop-cert');
  const { resources, diagnostics } = parseText(text, 'gw.yaml');
  assert.deepEqual(codes(diagnostics), ['warning TG2004 spec.servers[1].tls.credential_name']);
  assert.equal(diagnostics[0]!.hint, 'use credentialName');
  const gw = resources.gateways[0]!;
  assert.equal(gw.spec.servers![1]!.tls!.credentialName, 'shop-cert');
  assert.equal('credential_name' in gw.spec.servers![1]!.tls!, false);
  // locate still finds the field under its old name.
  assert.deepEqual(gw.locate('spec.servers[1].tls.credentialName'), { file: 'gw.yaml', line: 21, column: 24 });
  // The alias is validated like the field it stands for.
  const vs = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  tls:
  - match:
    - sni_hosts: 42
    route: [{destination: {host: db}}]
`;
  const r2 = parseText(vs, 'vs.yaml');
  assert.deepEqual(codes(r2.diagnostics), ['warning TG2004 spec.tls[0].match[0].sni_hosts', 'error TG2002 spec.tls[0].match[0].sniHosts']);
  assert.equal(r2.resources.virtualServices.length, 0);
});

test('mutually exclusive fields are TG2006', () => {
  const vs = `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  http:
  - match: [{uri: {exact: /a, regex: /b.*}}]
    route: [{destination: {host: a}}]
`;
  const { diagnostics } = parseText(vs, 'vs.yaml');
  assert.deepEqual(codes(diagnostics), ['error TG2006 spec.http[0].match[0].uri.regex']);
  assert.equal(diagnostics[0]!.hint, 'set only one of exact, prefix, regex');
});

test('broken YAML reports the line where the parser stopped; other documents still load', () => {
  const text = `${GATEWAY}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: [broken\nspec: {}\n---\n${GATEWAY.replace('name: gw', 'name: gw3')}`;
  const { resources, diagnostics } = parseText(text, 'multi.yaml');
  assert.deepEqual(resources.gateways.map((g) => g.metadata.name), ['gw', 'gw3']);
  assert.equal(diagnostics.length, 1);
  const d = diagnostics[0]!;
  assert.equal(d.code, 'TG1002');
  assert.equal(d.location!.file, 'multi.yaml');
  assert.ok(d.location!.line >= 26 && d.location!.line <= 27, `line ${d.location!.line}`);
  assert.doesNotMatch(d.message, /\n/);
  assert.doesNotMatch(d.message, /at line \d+/);
});

test('a single broken line is located exactly', () => {
  const { diagnostics } = parseText('a: 1\nb: c: d\n', 'x.yaml');
  assert.equal(diagnostics[0]!.code, 'TG1002');
  assert.deepEqual(diagnostics[0]!.location, { file: 'x.yaml', line: 2, column: 4 });
});

test('JSON input: a single object, an array, and a List', () => {
  const obj = { apiVersion: 'networking.istio.io/v1', kind: 'DestinationRule', metadata: { name: 'a' }, spec: { host: 'a', trafficPolicy: { tls: { mode: 'BOGUS' } } } };
  const one = parseText(JSON.stringify(obj, null, 2), 'a.json');
  assert.equal(one.diagnostics[0]!.code, 'TG2003');
  assert.equal(one.diagnostics[0]!.location!.line, 11);
  const ok = { ...obj, spec: { host: 'a' } };
  const arr = parseText(JSON.stringify([ok, { ...ok, metadata: { name: 'b' } }]), 'arr.json');
  assert.deepEqual(arr.resources.destinationRules.map((r) => r.metadata.name), ['a', 'b']);
  const list = parseText(JSON.stringify({ apiVersion: 'v1', kind: 'List', items: [ok, { ...obj, metadata: { name: 'c' } }] }, null, 1), 'list.json');
  assert.deepEqual(list.resources.destinationRules.map((r) => r.metadata.name), ['a']);
  assert.equal(list.diagnostics[0]!.path, 'spec.trafficPolicy.tls.mode');
  assert.ok(list.diagnostics[0]!.location!.line > 10, 'located inside the second item');
});

test('Secret: base64 data is decoded, stringData wins, a bad value is named but never printed', () => {
  const text = `apiVersion: v1
kind: Secret
metadata: {name: s}
type: kubernetes.io/tls
data:
  tls.crt: ${Buffer.from('CERT').toString('base64')}
  ca.crt: ${Buffer.from('CA').toString('base64')}
stringData:
  ca.crt: override
`;
  const { resources, diagnostics } = parseText(text, 's.yaml');
  assert.deepEqual(diagnostics, []);
  const s = resources.secrets[0]!;
  assert.equal(s.type, 'kubernetes.io/tls');
  assert.equal(s.data['tls.crt']!.toString(), 'CERT');
  assert.equal(s.data['ca.crt']!.toString(), 'override');
  const bad = parseText(text.replace(/tls\.crt: .*/, 'tls.crt: "s3cr3t-value!!"'), 's.yaml');
  assert.equal(bad.resources.secrets.length, 0);
  assert.deepEqual(codes(bad.diagnostics), ['error TG2005 data["tls.crt"]']);
  assert.equal(bad.diagnostics[0]!.location!.line, 6);
  assert.doesNotMatch(JSON.stringify(bad.diagnostics), /s3cr3t/);
});

test('other kinds are skipped as info; an unknown apiVersion warns; duplicates warn', () => {
  const text = `apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: s}\n---\n` +
    `apiVersion: networking.istio.io/v9\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n---\n` +
    `apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: a}\n---\n` +
    `apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {name: a, namespace: default}\nspec: {host: b}\n`;
  const { resources, diagnostics } = parseText(text, 'k.yaml');
  assert.deepEqual(codes(diagnostics), ['info TG1004', 'info TG1004', 'warning TG1004 apiVersion', 'warning TG1005']);
  assert.equal(diagnostics[0]!.message, 'skipped: kind Deployment is not used by tlsgate');
  assert.deepEqual(resources.destinationRules.map((d) => d.spec.host), ['a']);
  assert.equal(resources.gateways.length, 0);
});

test('loadConfig walks directories in sorted order and follows a mounted ConfigMap layout', withTmp(async (dir) => {
  const dr = (name: string) => `apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ${name}}\nspec: {host: ${name}}\n`;
  mkdirSync(join(dir, 'b', 'nested'), { recursive: true });
  writeFileSync(join(dir, 'b', 'nested', 'z.yml'), dr('nested'));
  writeFileSync(join(dir, 'a.yaml'), dr('a'));
  writeFileSync(join(dir, 'c.json'), JSON.stringify(JSON.parse(JSON.stringify({ apiVersion: 'networking.istio.io/v1', kind: 'DestinationRule', metadata: { name: 'c' }, spec: { host: 'c' } }))));
  writeFileSync(join(dir, 'notes.txt'), 'not config');
  // Kubernetes mounts: ..<timestamp>/ holds the files, ..data -> it, visible names link through ..data.
  mkdirSync(join(dir, 'mount', '..2024_01_01_00_00_00.1'), { recursive: true });
  writeFileSync(join(dir, 'mount', '..2024_01_01_00_00_00.1', 'm.yaml'), dr('mounted'));
  symlinkSync('..2024_01_01_00_00_00.1', join(dir, 'mount', '..data'));
  symlinkSync(join('..data', 'm.yaml'), join(dir, 'mount', 'm.yaml'));
  symlinkSync('missing.yaml', join(dir, 'mount', 'dangling.yaml'));
  const r = await loadConfig([dir]);
  assert.deepEqual(r.files, [join(dir, 'a.yaml'), join(dir, 'b', 'nested', 'z.yml'), join(dir, 'c.json'), join(dir, 'mount', 'm.yaml')]);
  assert.deepEqual(r.diagnostics, []);
  assert.deepEqual(r.resources.destinationRules.map((d) => d.metadata.name), ['a', 'nested', 'c', 'mounted']);
  assert.equal(r.resources.destinationRules[3]!.source.file, join(dir, 'mount', 'm.yaml'));
  // A file named twice is read once; duplicates across files are reported.
  writeFileSync(join(dir, 'dup.yaml'), dr('a'));
  const r2 = await loadConfig([join(dir, 'a.yaml'), join(dir, 'a.yaml'), join(dir, 'dup.yaml')]);
  assert.equal(r2.files.length, 2);
  assert.deepEqual(codes(r2.diagnostics), ['warning TG1005']);
  assert.match(r2.diagnostics[0]!.hint!, /a\.yaml:1:1/);
}));

test('loadConfig: a missing path is TG1001, an empty directory TG1006, and neither throws', withTmp(async (dir) => {
  const r = await loadConfig([join(dir, 'nope.yaml')]);
  assert.deepEqual(codes(r.diagnostics), ['error TG1001']);
  assert.match(r.diagnostics[0]!.message, /nope\.yaml: no such file or directory/);
  mkdirSync(join(dir, 'empty'));
  const e = await loadConfig([join(dir, 'empty')]);
  assert.deepEqual(codes(e.diagnostics), ['warning TG1006']);
}));

test('a thousand resources load and all are kept', () => {
  const docs: string[] = [];
  for (let i = 0; i < 1000; i++) {
    docs.push(`apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs${i}}\nspec:\n  hosts: [h${i}.example.com]\n  http:\n  - match: [{uri: {prefix: /}}]\n    route: [{destination: {host: svc${i}, port: {number: 80}}}]\n`);
  }
  const { resources, diagnostics } = parseText(docs.join('---\n'), 'big.yaml');
  assert.equal(diagnostics.length, 0);
  assert.equal(resources.virtualServices.length, 1000);
  assert.equal(resources.virtualServices[999]!.locate('spec.http[0].route[0].destination.host').line, 999 * 9 + 8);
});

test('property: parseText never throws on arbitrary text, and diagnostics are well formed', () => {
  const fragments = ['apiVersion: networking.istio.io/v1\n', 'kind: Gateway\n', 'kind: Secret\napiVersion: v1\n', 'metadata: {name: x}\n',
    'spec:\n', '  servers:\n', '  - port: {number: 1}\n', '---\n', '[', '{', ': ', '- ', '&a ', '*a ', '!!binary ', '"', '\t', 'data: {k: "@@"}\n', '\n'];
  const arb = fc.oneof(
    fc.string({ maxLength: 200 }),
    fc.array(fc.constantFrom(...fragments), { maxLength: 30 }).map((a) => a.join('')),
    fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.stringify(v)),
  );
  fc.assert(fc.property(arb, (text) => {
    const { diagnostics } = parseText(text, 'fuzz.yaml');
    for (const d of diagnostics) {
      assert.match(d.code, /^TG\d{4}$/);
      assert.ok(['error', 'warning', 'info'].includes(d.severity));
      if (d.location) assert.ok(d.location.line >= 1 && d.location.column >= 1);
    }
  }), { numRuns: 300, seed: 42 });
});

test('property: loadConfig never rejects on random file contents', withTmp(async (dir) => {
  await fc.assert(fc.asyncProperty(fc.string({ maxLength: 300 }), async (text) => {
    writeFileSync(join(dir, 'f.yaml'), text);
    const r = await loadConfig([dir]);
    assert.deepEqual(r.files, [join(dir, 'f.yaml')]);
  }), { numRuns: 50, seed: 7 });
}));

test('every code the loader emits is registered', async () => {
  const { DIAGNOSTIC_CODES } = await import('../../../src/config/diagnostics.js');
  const text = `${GATEWAY.replace('mode: SIMPLE', 'mode: X')}---\nfoo\n---\na: [\n`;
  for (const d of parseText(text, 'x.yaml').diagnostics) assert.ok(DIAGNOSTIC_CODES[d.code], d.code);
  assert.deepEqual(errors([]), []);
});

test('a Secret value of the wrong type is reported without its value', () => {
  const text = `apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata:\n  key: 987654321\nstringData:\n  pin: 4242\n`;
  const { resources, diagnostics } = parseText(text, 's.yaml');
  assert.equal(resources.secrets.length, 0);
  assert.deepEqual(codes(diagnostics), ['error TG2002 data.key', 'error TG2002 stringData.pin']);
  const all = JSON.stringify(diagnostics);
  assert.doesNotMatch(all, /987654321|4242/);
});
