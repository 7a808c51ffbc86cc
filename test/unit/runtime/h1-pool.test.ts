// The HTTP/1.1 upstream pool against real sockets: well-formed upstreams (Node's http server) and
// raw ones that send exactly the bytes a test wants, including malformed and hostile responses.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { after, describe, it } from 'node:test';
import type { Cluster } from '../../../src/model/snapshot.js';
import { ClusterManager, UpstreamError, type UpstreamResponse } from '../../../src/runtime/upstream/cluster-manager.js';

function cluster(port: number, over: Partial<Cluster> = {}): Cluster {
  return {
    name: 'c', serviceHost: 'svc.test', servicePort: port, discovery: 'STATIC',
    endpoints: [{ address: '127.0.0.1', port, weight: 1, labels: {} }],
    lbPolicy: 'ROUND_ROBIN', connectTimeoutMs: 2000, httpProtocol: 'http1', limits: {},
    ...over,
  };
}

async function readAll(body: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of body) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

interface RawUpstream {
  port: number;
  /** Connections accepted so far. */
  connections: number;
  /** Request heads received, in order. */
  heads: string[];
  close(): Promise<void>;
}

/**
 * A TCP server that reads request heads (requests without bodies) and answers each with what
 * `respond` returns for it: bytes to write, and whether to close afterwards.
 */
async function rawUpstream(respond: (head: string, n: number, socket: net.Socket) => Buffer | string | undefined): Promise<RawUpstream> {
  const sockets = new Set<net.Socket>();
  const up: RawUpstream = { port: 0, connections: 0, heads: [], close: async () => undefined };
  const server = net.createServer((s) => {
    up.connections++;
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
    let buf = '';
    let n = 0;
    s.on('data', (d: Buffer) => {
      buf += d.toString('latin1');
      for (let end = buf.indexOf('\r\n\r\n'); end >= 0; end = buf.indexOf('\r\n\r\n')) {
        const head = buf.slice(0, end);
        buf = buf.slice(end + 4);
        up.heads.push(head);
        const out = respond(head, ++n, s);
        if (out !== undefined) s.write(out);
      }
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  up.port = (server.address() as AddressInfo).port;
  up.close = () => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  };
  return up;
}

const get = (cm: ClusterManager, path = '/', method = 'GET'): Promise<UpstreamResponse> =>
  cm.request('c', { method, path, headers: ['host', 'svc.test'], body: null, host: 'svc.test' });

async function failure(p: Promise<unknown>): Promise<UpstreamError> {
  try {
    const r = await p;
    if (r && typeof r === 'object' && 'body' in r) await readAll((r as UpstreamResponse).body);
  } catch (e) {
    assert.ok(e instanceof UpstreamError, String(e));
    return e;
  }
  assert.fail('expected the request to fail');
}

describe('HTTP/1.1 upstream pool', () => {
  const cleanups: (() => Promise<unknown>)[] = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });
  const managed = (c: Cluster, opts: ConstructorParameters<typeof ClusterManager>[1] = {}): ClusterManager => {
    const cm = new ClusterManager({ c }, opts);
    cleanups.push(() => cm.close(100));
    return cm;
  };

  it('keeps one connection alive across requests and frames every body kind', async () => {
    const up = await rawUpstream((head) => {
      const path = head.split(' ')[1];
      if (path === '/len') return 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello';
      if (path === '/chunked') return 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\n\r\n';
      if (path === '/head') return 'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n';
      if (path === '/204') return 'HTTP/1.1 204 No Content\r\n\r\n';
      if (path === '/continue') return 'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok';
      return 'HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n';
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    const len = await get(cm, '/len');
    assert.equal(len.statusCode, 200);
    assert.deepEqual(len.headers['x-a'], ['1', '2']);
    assert.equal((await readAll(len.body)).toString(), 'hello');
    const ch = await get(cm, '/chunked');
    assert.equal((await readAll(ch.body)).toString(), 'hello world');
    const head = await get(cm, '/head', 'HEAD');
    assert.equal(head.headers['content-length'], '1000');
    assert.equal((await readAll(head.body)).length, 0);
    assert.equal((await get(cm, '/204')).statusCode, 204);
    const cont = await get(cm, '/continue');
    assert.equal(cont.statusCode, 201);
    assert.equal((await readAll(cont.body)).toString(), 'ok');
    for (let i = 0; i < 15; i++) assert.equal((await readAll((await get(cm, '/len')).body)).toString(), 'hello');
    assert.equal(up.connections, 1, 'every request reused the one connection');
    assert.match(up.heads[0]!, /^GET \/len HTTP\/1\.1\r\nhost: svc\.test$/);
    assert.match(up.heads[2]!, /^HEAD \/head HTTP\/1\.1/);
  });

  it('passes chunked trailers to the handler', async () => {
    const up = await rawUpstream(() => 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nGrpc-Status: 7\r\nGrpc-Message: denied\r\n\r\n');
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    const trailers = await new Promise<readonly unknown[]>((resolve, reject) => {
      cm.dispatch('c', { method: 'GET', path: '/', headers: ['host', 'svc.test'], body: null, host: 'svc.test' }, {
        onHeaders: () => undefined, onData: () => undefined,
        onEnd: (_c, t) => resolve(t), onError: (_c, e) => reject(e),
      });
    });
    assert.deepEqual(trailers.map(String), ['Grpc-Status', '7', 'Grpc-Message', 'denied']);
  });

  it('a response without length is read until the upstream closes, and that connection is not reused', async () => {
    const up = await rawUpstream((_h, _n, s) => {
      s.end('HTTP/1.1 200 OK\r\n\r\nuntil close');
      return undefined;
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    assert.equal((await readAll((await get(cm)).body)).toString(), 'until close');
    assert.equal((await readAll((await get(cm)).body)).toString(), 'until close');
    assert.equal(up.connections, 2);
  });

  for (const [what, response, code] of [
    ['Content-Length with Transfer-Encoding', 'HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n', 'UND_ERR_RESPONSE_PARSE'],
    ['two different Content-Lengths', 'HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd', 'UND_ERR_RESPONSE_PARSE'],
    ['an obs-fold line', 'HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n', 'UND_ERR_RESPONSE_PARSE'],
    ['a malformed status line', 'HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n', 'UND_ERR_RESPONSE_PARSE'],
    ['a bad chunk size', 'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n', 'UND_ERR_RESPONSE_PARSE'],
    ['a NUL in a header value', 'HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 0\r\n\r\n', 'UND_ERR_RESPONSE_PARSE'],
    ['a head over 64 KiB', `HTTP/1.1 200 OK\r\nX-Big: ${'a'.repeat(70 * 1024)}\r\nContent-Length: 0\r\n\r\n`, 'UND_ERR_HEADERS_OVERFLOW'],
  ] as const) {
    it(`rejects a response with ${what} (upstream_reset) and closes that connection`, async () => {
      const up = await rawUpstream((head) => (head.includes('/good') ? 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok' : response));
      cleanups.push(() => up.close());
      const cm = managed(cluster(up.port));
      const e = await failure(get(cm, '/bad'));
      assert.equal(e.reason, 'upstream_reset');
      assert.equal(e.code, code);
      assert.equal((await readAll((await get(cm, '/good')).body)).toString(), 'ok');
      assert.equal(up.connections, 2, 'the connection that sent the bad response was not reused');
    });
  }

  it('bytes past the end of a response make its connection unusable, not the next response', async () => {
    const up = await rawUpstream(() => (up.heads.length === 1 ? 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled' : 'HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal'));
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    assert.equal((await readAll((await get(cm)).body)).toString(), 'ok');
    assert.equal((await readAll((await get(cm)).body)).toString(), 'real');
    assert.equal(up.connections, 2);
  });

  it('a trickling upstream (one byte per write) still gets through, and one that never ends its head is cut off', async () => {
    const response = Buffer.from('HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: 0123456789\r\n\r\nok');
    const up = await rawUpstream((head, _n, s) => {
      if (head.includes('/slow')) {
        let i = 0;
        const t = setInterval(() => {
          if (s.destroyed || i >= response.length) { clearInterval(t); return; }
          s.write(response.subarray(i, ++i));
        }, 1);
        return undefined;
      }
      // 2000 pieces of a head that never ends.
      let k = 0;
      const t = setInterval(() => {
        if (s.destroyed || k++ >= 2000) { clearInterval(t); return; }
        s.write(k === 1 ? 'HTTP/1.1 200 OK\r\nX-A: ' : 'a');
      }, 0);
      return undefined;
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    assert.equal((await readAll((await get(cm, '/slow')).body)).toString(), 'ok');
    const e = await failure(get(cm, '/endless'));
    assert.equal(e.reason, 'upstream_reset');
  });

  it('request bodies: buffered with a length, streamed with a length, streamed chunked', async () => {
    const seen: { te?: string; cl?: string; sha: string }[] = [];
    const server = http.createServer((req, res) => {
      const h = createHash('sha256');
      req.on('data', (c: Buffer) => h.update(c));
      req.on('end', () => {
        seen.push({ te: req.headers['transfer-encoding'], cl: req.headers['content-length'], sha: h.digest('hex') });
        res.end('done');
      });
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    cleanups.push(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
    const cm = managed(cluster((server.address() as AddressInfo).port));
    const big = randomBytes(1024 * 1024 + 17);
    const sha = createHash('sha256').update(big).digest('hex');
    const send = async (body: Buffer | Readable, headers: string[]): Promise<string> => {
      const r = await cm.request('c', { method: 'POST', path: '/up', headers: ['host', 'svc.test', ...headers], body, host: 'svc.test' });
      return (await readAll(r.body)).toString();
    };
    assert.equal(await send(big, []), 'done');
    assert.equal(await send(Readable.from([big.subarray(0, 1000), big.subarray(1000)]), ['content-length', String(big.length)]), 'done');
    assert.equal(await send(Readable.from([big.subarray(0, 70_000), big.subarray(70_000)]), []), 'done');
    assert.deepEqual(seen, [
      { te: undefined, cl: String(big.length), sha },
      { te: undefined, cl: String(big.length), sha },
      { te: 'chunked', cl: undefined, sha },
    ]);
    // A body shorter than its declared length fails the request instead of hanging the upstream.
    const e = await failure(cm.request('c', { method: 'POST', path: '/up', headers: ['host', 'svc.test', 'content-length', '10'], body: Readable.from([Buffer.from('abc')]), host: 'svc.test' }));
    assert.equal(e.code, 'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH');
  });

  it('a header value with CR/LF is never written upstream', async () => {
    const up = await rawUpstream(() => 'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n');
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    const e = await failure(cm.request('c', { method: 'GET', path: '/', headers: ['host', 'svc.test', 'x-evil', 'a\r\nx-injected: 1'], body: null, host: 'svc.test' }));
    assert.equal(e.reason, 'internal_error');
    assert.equal(up.heads.length, 0);
  });

  it('maxConnections bounds the connections; the rest wait their turn and all complete', async () => {
    let open = 0;
    let peak = 0;
    const up = await rawUpstream((_h, _n, s) => {
      setTimeout(() => s.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok'), 20);
      return undefined;
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port, { limits: { maxConnections: 2 } }));
    const all = await Promise.all(Array.from({ length: 8 }, async () => {
      open++;
      peak = Math.max(peak, open);
      const r = await get(cm);
      const body = (await readAll(r.body)).toString();
      open--;
      return body;
    }));
    assert.deepEqual(all, Array(8).fill('ok'));
    assert.equal(peak, 8, 'all eight were in flight at once');
    assert.equal(up.connections, 2);
  });

  it('an idle connection the upstream closes leaves the pool (it never counts toward maxConnections)', async () => {
    const up = await rawUpstream((_h, _n, s) => {
      s.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
      setTimeout(() => s.end(), 30);
      return undefined;
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port, { limits: { maxConnections: 1 } }));
    for (let i = 0; i < 3; i++) {
      assert.equal((await readAll((await get(cm)).body)).toString(), 'ok');
      await new Promise((r) => setTimeout(r, 120));
    }
    assert.equal(up.connections, 3);
  });

  it('maxRequestsPerConnection closes a connection after that many requests', async () => {
    const up = await rawUpstream(() => 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port, { limits: { maxRequestsPerConnection: 2 } }));
    for (let i = 0; i < 5; i++) await readAll((await get(cm)).body);
    assert.equal(up.connections, 3);
  });

  it("honours the upstream's Keep-Alive timeout hint and Connection: close", async () => {
    const up = await rawUpstream((head) => (head.includes('/close')
      ? 'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok'
      : 'HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok'));
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    await readAll((await get(cm, '/hint')).body);
    await readAll((await get(cm, '/hint')).body);
    await readAll((await get(cm, '/close')).body);
    await readAll((await get(cm, '/close')).body);
    // timeout=1 leaves no safe reuse window: every request had a connection of its own.
    assert.equal(up.connections, 4);
  });

  it('a kept-alive connection closed under a GET is retried once on a new one; a POST with a body fails', async () => {
    const up = await rawUpstream((_h, n, s) => {
      if (n === 2) {
        s.destroy();
        return undefined;
      }
      return 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok';
    });
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port));
    await readAll((await get(cm)).body);
    assert.equal((await readAll((await get(cm)).body)).toString(), 'ok');
    assert.equal(up.connections, 2);
    await readAll((await get(cm)).body); // second connection, its request 2 next
    const e = await failure(cm.request('c', { method: 'POST', path: '/', headers: ['host', 'svc.test'], body: Buffer.from('x'), host: 'svc.test' }));
    assert.equal(e.reason, 'upstream_reset');
  });

  it('an upstream that stops sending mid-body times out (upstream_timeout)', async () => {
    const up = await rawUpstream(() => 'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc');
    cleanups.push(() => up.close());
    const cm = managed(cluster(up.port), { streamIdleTimeoutMs: 300 });
    const e = await failure(get(cm));
    assert.equal(e.reason, 'upstream_timeout');
    assert.equal(e.code, 'UND_ERR_BODY_TIMEOUT');
    const up2 = await rawUpstream(() => undefined);
    cleanups.push(() => up2.close());
    const cm2 = managed(cluster(up2.port), { streamIdleTimeoutMs: 300 });
    const e2 = await failure(get(cm2));
    assert.equal(e2.code, 'UND_ERR_HEADERS_TIMEOUT');
  });

  it('a slow reader pauses the upstream (backpressure) and still gets every byte', async () => {
    const big = randomBytes(8 * 1024 * 1024);
    const server = http.createServer((_req, res) => res.end(big));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    cleanups.push(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
    const cm = managed(cluster((server.address() as AddressInfo).port));
    const r = await get(cm);
    const h = createHash('sha256');
    let n = 0;
    for await (const c of r.body) {
      h.update(c as Buffer);
      if (++n % 16 === 0) await new Promise((res) => setTimeout(res, 1));
    }
    assert.equal(h.digest('hex'), createHash('sha256').update(big).digest('hex'));
  });
});
