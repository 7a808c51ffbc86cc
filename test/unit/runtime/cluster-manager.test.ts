import assert from 'node:assert/strict';
import { once } from 'node:events';
import { rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import tls from 'node:tls';
import { after, before, describe, it } from 'node:test';
import type { Cluster } from '../../../src/model/snapshot.js';
import { ClusterManager, UpstreamError, tlsConnectOptions, type SecretMaterial } from '../../../src/runtime/upstream/cluster-manager.js';
import { DnsCache, DnsError, type LookupFn } from '../../../src/runtime/upstream/dns.js';
import { createLoadBalancer, pickWeighted, seededRandom, type LbHost } from '../../../src/runtime/upstream/load-balancer.js';
import { certDir, makeCa, makeLeaf, type Ca, type KeyPair } from '../../helpers/certs.js';

function count<T>(items: T[]): Map<T, number> {
  const m = new Map<T, number>();
  for (const i of items) m.set(i, (m.get(i) ?? 0) + 1);
  return m;
}

describe('load balancers', () => {
  const a = { name: 'a', weight: 3, active: 0 };
  const b = { name: 'b', weight: 1, active: 0 };

  it('ROUND_ROBIN: exact weighted shares, interleaved', () => {
    const lb = createLoadBalancer<typeof a>('ROUND_ROBIN');
    const hosts = [a, b];
    const picks = Array.from({ length: 400 }, () => lb.pick(hosts)!.name);
    assert.deepEqual([count(picks).get('a'), count(picks).get('b')], [300, 100]);
    // Smooth: never four b's in a row and the first window of 4 has exactly one b.
    assert.equal(picks.slice(0, 4).filter((p) => p === 'b').length, 1);
  });

  it('ROUND_ROBIN: equal weights rotate', () => {
    const lb = createLoadBalancer<LbHost & { name: string }>('ROUND_ROBIN');
    const hosts = [{ name: 'x', weight: 1, active: 0 }, { name: 'y', weight: 1, active: 0 }, { name: 'z', weight: 1, active: 0 }];
    assert.deepEqual(Array.from({ length: 6 }, () => lb.pick(hosts)!.name), ['x', 'y', 'z', 'x', 'y', 'z']);
  });

  it('RANDOM: weighted with a seeded source', () => {
    const lb = createLoadBalancer<typeof a>('RANDOM', { random: seededRandom(42) });
    const picks = Array.from({ length: 10_000 }, () => lb.pick([a, b])!.name);
    const share = count(picks).get('a')! / picks.length;
    assert.ok(share > 0.72 && share < 0.78, `a share ${share}`);
  });

  it('LEAST_REQUEST: prefers the idle host', () => {
    const lb = createLoadBalancer<LbHost & { name: string }>('LEAST_REQUEST', { random: seededRandom(7) });
    const hosts = [{ name: 'busy', weight: 1, active: 10 }, { name: 'idle', weight: 1, active: 0 }];
    const picks = Array.from({ length: 1000 }, () => lb.pick(hosts)!.name);
    assert.equal(count(picks).get('idle'), 1000);
  });

  it('LEAST_REQUEST: weights count when loads are equal', () => {
    const lb = createLoadBalancer<typeof a>('LEAST_REQUEST', { random: seededRandom(9) });
    const picks = Array.from({ length: 1000 }, () => lb.pick([a, b])!.name);
    // Two distinct hosts are compared and a (weight 3) has less load per weight: always a.
    assert.equal(count(picks).get('a'), 1000);
  });

  it('zero weights are skipped unless all are zero', () => {
    const lb = createLoadBalancer<LbHost & { name: string }>('RANDOM', { random: seededRandom(1) });
    const hosts = [{ name: 'z', weight: 0, active: 0 }, { name: 'w', weight: 5, active: 0 }];
    assert.equal(new Set(Array.from({ length: 200 }, () => lb.pick(hosts)!.name)).size, 1);
    const allZero = [{ name: 'p', weight: 0, active: 0 }, { name: 'q', weight: 0, active: 0 }];
    assert.equal(new Set(Array.from({ length: 200 }, () => lb.pick(allZero)!.name)).size, 2);
    assert.equal(lb.pick([]), undefined);
  });

  it('pickWeighted', () => {
    assert.equal(pickWeighted([75, 25], 100, 0), 0);
    assert.equal(pickWeighted([75, 25], 100, 0.7499), 0);
    assert.equal(pickWeighted([75, 25], 100, 0.75), 1);
    assert.equal(pickWeighted([0, 10], 10, 0), 1);
    assert.equal(pickWeighted([0, 0], 0, 0.5), -1);
    assert.equal(pickWeighted([1, 1], 2, 0.9999999999), 1);
  });
});

describe('DnsCache', () => {
  function fakeLookup(answers: Record<string, string[] | string>): { fn: LookupFn; calls: string[] } {
    const calls: string[] = [];
    const fn: LookupFn = (host, _opts, cb) => {
      calls.push(host);
      const a = answers[host];
      setImmediate(() => {
        if (a === undefined || typeof a === 'string') cb(Object.assign(new Error('nope'), { code: a ?? 'ENOTFOUND' }), []);
        else cb(null, a.map((address) => ({ address, family: net.isIP(address) })));
      });
    };
    return { fn, calls };
  }

  it('caches answers for the TTL and coalesces concurrent lookups', async () => {
    let now = 1000;
    const { fn, calls } = fakeLookup({ 'svc.test': ['10.0.0.2', '10.0.0.1'] });
    const dns = new DnsCache({ lookup: fn, ttlMs: 30_000, now: () => now });
    const [x, y] = await Promise.all([dns.resolve('svc.test'), dns.resolve('svc.test')]);
    assert.deepEqual(x, ['10.0.0.1', '10.0.0.2']);
    assert.equal(x, y);
    assert.equal(calls.length, 1);
    now += 29_000;
    assert.deepEqual(dns.cached('svc.test'), ['10.0.0.1', '10.0.0.2']);
    now += 2_000;
    assert.equal(dns.cached('svc.test'), undefined);
    const z = await dns.resolve('svc.test');
    assert.equal(calls.length, 2);
    assert.equal(z, x, 'an unchanged answer keeps its identity');
  });

  it('caches failures briefly, passes IPs through', async () => {
    let now = 0;
    const { fn, calls } = fakeLookup({});
    const dns = new DnsCache({ lookup: fn, negativeTtlMs: 2_000, now: () => now });
    await assert.rejects(dns.resolve('gone.test'), (e: unknown) => e instanceof DnsError && e.code === 'ENOTFOUND');
    await assert.rejects(dns.resolve('gone.test'));
    assert.equal(calls.length, 1);
    now += 2_001;
    await assert.rejects(dns.resolve('gone.test'));
    assert.equal(calls.length, 2);
    assert.deepEqual(await dns.resolve('192.0.2.1'), ['192.0.2.1']);
    assert.deepEqual(await dns.resolve('::1'), ['::1']);
    assert.equal(calls.length, 2);
  });
});

// ---------------------------------------------------------------- real upstreams

function cluster(name: string, port: number, over: Partial<Cluster> = {}): Cluster {
  return {
    name, serviceHost: 'svc.test', servicePort: port, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2000, httpProtocol: 'http1', limits: {},
    ...over,
  };
}

async function readAll(body: NodeJS.ReadableStream): Promise<string> {
  let s = '';
  for await (const c of body) s += String(c);
  return s;
}

interface Upstream {
  port: number;
  connections: number;
  requests: number;
  server: net.Server;
  close(): Promise<void>;
}

async function startHttp(handler: http.RequestListener, opts: { tls?: tls.TlsOptions } = {}): Promise<Upstream> {
  const server = opts.tls !== undefined
    ? (await import('node:https')).createServer(opts.tls, handler)
    : http.createServer(handler);
  const up: Upstream = {
    port: 0, connections: 0, requests: 0, server,
    close: () => {
      server.closeAllConnections();
      return new Promise<void>((r) => server.close(() => r()));
    },
  };
  server.on(opts.tls !== undefined ? 'secureConnection' : 'connection', () => { up.connections++; });
  server.on('request', () => { up.requests++; });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  up.port = (server.address() as AddressInfo).port;
  return up;
}

async function closedPort(): Promise<number> {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

describe('ClusterManager', () => {
  let up: Upstream;
  let slow: Upstream;
  const pendingSlow: http.ServerResponse[] = [];

  before(async () => {
    up = await startHttp((req, res) => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ method: req.method, url: req.url, host: req.headers.host, port: req.socket.localPort }));
    });
    slow = await startHttp((_req, res) => { pendingSlow.push(res); });
  });
  after(async () => {
    for (const r of pendingSlow) r.destroy();
    await up.close();
    await slow.close();
  });

  it('sends a request to a STATIC endpoint and streams the body back', async () => {
    const cm = new ClusterManager({ c: cluster('c', up.port) });
    try {
      const r = await cm.request('c', { method: 'GET', path: '/x?y=1', headers: { host: 'svc.test' }, body: null, host: 'svc.test' });
      assert.equal(r.statusCode, 200);
      assert.equal(r.endpoint, `127.0.0.1:${up.port}`);
      assert.deepEqual(JSON.parse(await readAll(r.body)), { method: 'GET', url: '/x?y=1', host: 'svc.test', port: up.port });
      assert.deepEqual(cm.stats('c'), { active: 0, pending: 0 });
    } finally {
      await cm.close();
    }
  });

  it('resolves DNS endpoints through the cache', async () => {
    const calls: string[] = [];
    const dns = new DnsCache({ lookup: (h, _o, cb) => { calls.push(h); setImmediate(() => cb(null, [{ address: '127.0.0.1', family: 4 }])); } });
    const cm = new ClusterManager({
      d: cluster('d', up.port, { discovery: 'DNS', endpoints: [{ address: 'upstream.test', port: up.port, weight: 1, labels: {} }] }),
    }, { dns });
    try {
      for (let i = 0; i < 3; i++) {
        const r = await cm.request('d', { method: 'GET', path: '/', headers: { host: 'upstream.test' }, body: null, host: 'upstream.test' });
        assert.equal(r.statusCode, 200);
        await readAll(r.body);
      }
      assert.deepEqual(calls, ['upstream.test']);
    } finally {
      await cm.close();
    }
  });

  const failures: [string, () => Promise<Record<string, Cluster>>, string, string | undefined][] = [
    ['unknown cluster', async () => ({}), 'no_healthy_upstream', 'UNKNOWN_CLUSTER'],
    ['no endpoints', async () => ({ c: cluster('c', 1, { endpoints: [] }) }), 'no_healthy_upstream', 'NO_ENDPOINTS'],
    ['ORIGINAL_DST is not supported yet', async () => ({ c: cluster('c', 1, { discovery: 'ORIGINAL_DST' }) }), 'no_healthy_upstream', 'ORIGINAL_DST_UNSUPPORTED'],
    ['connection refused', async () => ({ c: cluster('c', await closedPort()) }), 'upstream_connect_failed', 'ECONNREFUSED'],
  ];
  for (const [name, make, reason, code] of failures) {
    it(`${name} -> ${reason}`, async () => {
      const cm = new ClusterManager(await make());
      try {
        await assert.rejects(cm.request('c', { method: 'GET', path: '/', headers: {}, body: null, host: 'h' }),
          (e: unknown) => e instanceof UpstreamError && e.reason === reason && e.code === code && e.status === 503);
      } finally {
        await cm.close();
      }
    });
  }

  it('circuit breaker: maxRequests -> upstream_overflow', async () => {
    const cm = new ClusterManager({ c: cluster('c', slow.port, { limits: { maxRequests: 1 } }) });
    try {
      const first = cm.request('c', { method: 'GET', path: '/', headers: {}, body: null, host: 'h' });
      await assert.rejects(cm.request('c', { method: 'GET', path: '/', headers: {}, body: null, host: 'h' }),
        (e: unknown) => e instanceof UpstreamError && e.reason === 'upstream_overflow' && e.status === 503);
      assert.equal(cm.stats('c')!.active, 1);
      // Let the first one finish: answer it once the upstream holds it (bounded wait).
      for (let i = 0; i < 200 && pendingSlow.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
      pendingSlow.shift()?.end('late');
      const r = await first;
      assert.equal(await readAll(r.body), 'late');
      assert.deepEqual(cm.stats('c'), { active: 0, pending: 0 });
    } finally {
      await cm.close(1000);
    }
  });

  it('update keeps pools of unchanged endpoints (no new connection)', async () => {
    const cm = new ClusterManager({ c: cluster('c', up.port) });
    try {
      const get = async (): Promise<void> => {
        const r = await cm.request('c', { method: 'GET', path: '/', headers: {}, body: null, host: 'h' });
        await readAll(r.body);
      };
      await get();
      await get();
      const warm = up.connections;
      cm.update({ c: cluster('c', up.port), other: cluster('other', 1) });
      await get();
      await get();
      assert.equal(up.connections, warm, 'same endpoint and settings: the warm pool is kept');
      // A changed setting (connect timeout) means a new pool and a new connection.
      cm.update({ c: cluster('c', up.port, { connectTimeoutMs: 999 }) });
      await get();
      assert.equal(up.connections, warm + 1);
    } finally {
      await cm.close();
    }
  });

  it('connectTcp gives a raw socket to an endpoint', async () => {
    const echo = net.createServer((s) => s.pipe(s)).listen(0, '127.0.0.1');
    await once(echo, 'listening');
    const port = (echo.address() as AddressInfo).port;
    const cm = new ClusterManager({ t: cluster('t', port) });
    try {
      const { socket, endpoint } = await cm.connectTcp('t', { timeoutMs: 1000 });
      assert.equal(endpoint, `127.0.0.1:${port}`);
      socket.write('ping');
      const [data] = await once(socket, 'data');
      assert.equal(String(data), 'ping');
      assert.equal(cm.stats('t')!.active, 1);
      socket.destroy();
      await once(socket, 'close');
      assert.equal(cm.stats('t')!.active, 0);
    } finally {
      await cm.close();
      echo.close();
    }
  });
});

describe('ClusterManager TLS origination', () => {
  let dir: string;
  let ca: Ca;
  let otherCa: Ca;
  let server: KeyPair;
  let clientPair: KeyPair;
  let up: Upstream;
  let secrets: Record<string, SecretMaterial>;

  before(async () => {
    dir = await certDir('tlsgate-cm-');
    ca = await makeCa(dir, 'ca', '/O=up/CN=up-ca');
    otherCa = await makeCa(dir, 'other', '/O=other/CN=other-ca');
    server = await makeLeaf(dir, ca, 'server', { cn: 'api.up.test', sans: ['DNS:api.up.test', 'URI:spiffe://up/ns/a/sa/api'], serial: 10 });
    clientPair = await makeLeaf(dir, ca, 'client', { cn: 'gw', serial: 11 });
    up = await startHttp((req, res) => {
      const peer = (req.socket as tls.TLSSocket).getPeerCertificate();
      res.end(JSON.stringify({ sni: (req.socket as tls.TLSSocket & { servername?: string }).servername, clientCn: peer?.subject?.CN ?? null }));
    }, { tls: { cert: server.certPem, key: server.keyPem, ca: ca.certPem, requestCert: true, rejectUnauthorized: false } as tls.TlsOptions });
    secrets = {
      'ca': { caPem: ca.certPem },
      'other': { caPem: otherCa.certPem },
      'client': { certChainPem: clientPair.certPem, privateKeyPem: clientPair.keyPem },
    };
  });
  after(async () => {
    await up.close();
    await rm(dir, { recursive: true, force: true });
  });

  function tlsCluster(over: Partial<NonNullable<Cluster['tls']>>): Cluster {
    return cluster('c', up.port, {
      tls: {
        mode: 'SIMPLE', sni: 'api.up.test', autoSni: false, validationCa: 'ca', subjectAltNames: [], autoSanValidation: true,
        insecureSkipVerify: false, alpn: [], minVersion: 'TLSv1.2', maxVersion: 'TLSv1.3', ...over,
      },
    });
  }

  async function get(cm: ClusterManager, host = 'api.up.test'): Promise<Record<string, unknown>> {
    const r = await cm.request('c', { method: 'GET', path: '/', headers: { host }, body: null, host });
    return JSON.parse(await readAll(r.body)) as Record<string, unknown>;
  }

  const ok: [string, Partial<NonNullable<Cluster['tls']>>, Record<string, unknown>][] = [
    ['SIMPLE with CA and SNI', {}, { sni: 'api.up.test', clientCn: null }],
    ['MUTUAL sends the client certificate', { mode: 'MUTUAL', clientCertificate: 'client' }, { sni: 'api.up.test', clientCn: 'gw' }],
    ['subjectAltNames (URI) accepted', { subjectAltNames: ['spiffe://up/ns/a/sa/api'] }, { sni: 'api.up.test', clientCn: null }],
    ['autoSni uses the request Host', { sni: undefined, autoSni: true }, { sni: 'api.up.test', clientCn: null }],
    ['insecureSkipVerify with the wrong CA', { validationCa: 'other', insecureSkipVerify: true }, { sni: 'api.up.test', clientCn: null }],
  ];
  for (const [name, over, want] of ok) {
    it(name, async () => {
      const cm = new ClusterManager({ c: tlsCluster(over) }, { secrets: (n) => secrets[n] });
      try {
        assert.deepEqual(await get(cm), want);
      } finally {
        await cm.close();
      }
    });
  }

  const bad: [string, Partial<NonNullable<Cluster['tls']>>, string][] = [
    // The test server sends its CA along (OpenSSL completes the chain), hence SELF_SIGNED_CERT_IN_CHAIN.
    ['wrong CA', { validationCa: 'other' }, 'SELF_SIGNED_CERT_IN_CHAIN'],
    ['SNI not in the certificate', { sni: 'evil.test' }, 'ERR_TLS_CERT_ALTNAME_INVALID'],
    ['SAN list not presented', { subjectAltNames: ['spiffe://up/ns/a/sa/other'] }, 'ERR_TLS_CERT_ALTNAME_INVALID'],
    ['CA secret missing: fail closed, no connection', { validationCa: 'absent' }, 'TLS_MATERIAL_UNAVAILABLE'],
    ['MUTUAL without client certificate: fail closed', { mode: 'MUTUAL', clientCertificate: 'absent' }, 'TLS_MATERIAL_UNAVAILABLE'],
  ];
  for (const [name, over, code] of bad) {
    it(`${name} -> upstream_tls_failed ${code}`, async () => {
      const before = up.requests;
      const cm = new ClusterManager({ c: tlsCluster(over) }, { secrets: (n) => secrets[n] });
      try {
        const err = await get(cm).then(() => undefined, (e: unknown) => e);
        assert.ok(err instanceof UpstreamError, String(err));
        assert.deepEqual([err.reason, err.code], ['upstream_tls_failed', code]);
        assert.equal(up.requests, before, 'no request reached the upstream');
      } finally {
        await cm.close();
      }
    });
  }

  it('tlsConnectOptions: SNI never an IP, system roots without a ca option', () => {
    const c = tlsCluster({ sni: undefined, autoSni: true, validationCa: 'system' });
    const r = tlsConnectOptions(c, '10.1.2.3:443', () => undefined);
    assert.equal(r.ok, true);
    assert.equal(r.ok && r.servername, undefined);
    const r2 = tlsConnectOptions(c, 'Api.Up.Test:8443', () => undefined);
    assert.equal(r2.ok && r2.servername, 'api.up.test');
  });

  it('connectTcp originates TLS and fails closed on a wrong CA', async () => {
    const cm = new ClusterManager({ c: tlsCluster({}) }, { secrets: (n) => secrets[n] });
    const bad = new ClusterManager({ c: tlsCluster({ validationCa: 'other' }) }, { secrets: (n) => secrets[n] });
    try {
      const { socket } = await cm.connectTcp('c', { timeoutMs: 2000 });
      assert.equal((socket as tls.TLSSocket).authorized, true);
      socket.destroy();
      await assert.rejects(bad.connectTcp('c', { timeoutMs: 2000 }), (e: unknown) => e instanceof UpstreamError && e.reason === 'upstream_tls_failed');
    } finally {
      await cm.close();
      await bad.close();
    }
  });
});
