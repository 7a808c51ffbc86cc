/**
 * CONNECT tunnels on a sidecar's outbound proxy (the app's HTTPS_PROXY). A tunnel is routed by
 * the tunnelled ClientHello's SNI when a VirtualService tls route claims the port, otherwise by
 * the CONNECT target host (tcp routes, ServiceEntry ports). The app's bytes are relayed as they
 * are: its TLS stays end to end, and a cluster with ISTIO_MUTUAL wraps it in mTLS (double
 * encryption).
 */
import type * as net from 'node:net';
import type { IncomingMessage } from 'node:http';
import type { ConnectTunnelRoute } from '../../model/snapshot.js';
import { getConnectionInfo, type ConnectionInfo } from '../connection-info.js';
import type { Telemetry } from '../telemetry.js';
import { readClientHello } from '../listener/client-hello.js';
import { proxyTcp, type TcpConnector } from './tcp-proxy.js';

function hostMatches(pattern: string, host: string): boolean {
  if (pattern === '*' || pattern === host) return true;
  return pattern.startsWith('*.') && host.length > pattern.length - 1 && host.endsWith(pattern.slice(1));
}

/** The most specific route among `candidates` whose patterns cover `name`. */
function best(candidates: ConnectTunnelRoute[], name: string, key: 'serverNames' | 'hosts'): ConnectTunnelRoute | undefined {
  let found: ConnectTunnelRoute | undefined;
  let score = -1;
  for (const r of candidates) {
    for (const p of r[key]) {
      if (!hostMatches(p, name)) continue;
      const s = p === name ? 100_000 : p.length;
      if (s > score) { score = s; found = r; }
    }
  }
  return found;
}

export function handleConnect(
  routes: readonly ConnectTunnelRoute[], req: IncomingMessage, socket: net.Socket, head: Buffer,
  env: { clusters: TcpConnector; telemetry: Telemetry; clientHelloTimeoutMs: number },
): void {
  socket.on('error', () => {});
  const target = req.url ?? '';
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(target);
  const base = getConnectionInfo(socket);
  const info: ConnectionInfo = {
    ...(base ?? { id: '', startMs: Date.now(), downstreamRemoteAddress: socket.remoteAddress ?? '', downstreamRemotePort: socket.remotePort ?? 0, downstreamLocalAddress: '', downstreamLocalPort: 0, listener: '' }),
    startMs: Date.now(),
    chain: `CONNECT ${target}`,
  };
  const refuse = (status: number, reason: string) => {
    env.telemetry.accessLog({ time: new Date(info.startMs).toISOString(), kind: 'tunnel', method: 'CONNECT', authority: target, status, listener: info.listener, reason });
    const text = status === 400 ? 'Bad Request' : status === 403 ? 'Forbidden' : 'Not Found';
    socket.end(`HTTP/1.1 ${status} ${text}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`);
  };
  if (!m) return refuse(400, 'bad_request');
  const host = m[1]!.toLowerCase();
  const port = Number(m[2]);
  const forPort = routes.filter((r) => r.port === undefined || r.port === port);
  const bySni = forPort.filter((r) => r.serverNames.length > 0);
  const byHost = best(forPort.filter((r) => r.hosts.length > 0), host, 'hosts');
  if (bySni.length === 0 && !byHost) return refuse(404, 'no_route');
  socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
  if (head.length) socket.unshift(head);
  if (bySni.length === 0) {
    proxyTcp(socket, undefined, byHost!.proxy, info, env);
    return;
  }
  // A tls route claims this port: the SNI of the app's own ClientHello decides.
  void readClientHello(socket, { timeoutMs: env.clientHelloTimeoutMs, maxBytes: 64 * 1024 }).then((hello) => {
    if (socket.destroyed) return;
    if (hello.kind === 'tls' && hello.sni !== undefined) {
      info.sni = hello.sni;
      info.alpnOffered = hello.alpn;
    }
    const route = (hello.kind === 'tls' && hello.sni !== undefined ? best(bySni, hello.sni, 'serverNames') : undefined) ?? byHost;
    if (!route) {
      env.telemetry.accessLog({ time: new Date(info.startMs).toISOString(), kind: 'tunnel', method: 'CONNECT', authority: target, sni: info.sni, listener: info.listener, reason: hello.kind === 'tls' ? 'no_sni_match' : 'not_tls' });
      socket.destroy();
      return;
    }
    proxyTcp(socket, hello.bytes, route.proxy, info, env);
  }, () => socket.destroy());
}
