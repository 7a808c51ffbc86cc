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
import { isoTime } from '../iso-time.js';

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

/** A CONNECT target split, and the routes that could take it (phase one of the selection). */
export interface ConnectCandidates {
  host: string;
  port: number;
  /** Routes on this port chosen by SNI: non-empty = the tunnelled ClientHello's SNI decides. */
  bySni: ConnectTunnelRoute[];
  /** The route chosen by the CONNECT host, if any; also the fallback when no SNI route matches. */
  byHost: ConnectTunnelRoute | undefined;
}

/**
 * Pure phase one: parse `host:port` and find the candidate routes. undefined = malformed target
 * (400); no bySni and no byHost = no route (404).
 */
export function connectCandidates(routes: readonly ConnectTunnelRoute[], target: string): ConnectCandidates | undefined {
  const m = /^\[?([^\]]+?)\]?:(\d{1,5})$/.exec(target);
  if (!m) return undefined;
  const host = m[1]!.toLowerCase();
  const port = Number(m[2]);
  const forPort = routes.filter((r) => r.port === undefined || r.port === port);
  return { host, port, bySni: forPort.filter((r) => r.serverNames.length > 0), byHost: best(forPort.filter((r) => r.hosts.length > 0), host, 'hosts') };
}

/**
 * Pure phase two: the route for the tunnelled ClientHello's SNI (undefined when the tunnel does
 * not start with TLS or sends no SNI), falling back to the route chosen by host.
 */
export function selectTunnelRoute(c: ConnectCandidates, sni: string | undefined): { route: ConnectTunnelRoute; by: 'sni' | 'host' } | undefined {
  const bySni = sni !== undefined ? best(c.bySni, sni, 'serverNames') : undefined;
  if (bySni) return { route: bySni, by: 'sni' };
  return c.byHost ? { route: c.byHost, by: 'host' } : undefined;
}

export function handleConnect(
  routes: readonly ConnectTunnelRoute[], req: IncomingMessage, socket: net.Socket, head: Buffer,
  env: { clusters: TcpConnector; telemetry: Telemetry; clientHelloTimeoutMs: number },
): void {
  socket.on('error', () => {});
  const target = req.url ?? '';
  const base = getConnectionInfo(socket);
  const info: ConnectionInfo = {
    ...(base ?? { id: '', startMs: Date.now(), downstreamRemoteAddress: socket.remoteAddress ?? '', downstreamRemotePort: socket.remotePort ?? 0, downstreamLocalAddress: '', downstreamLocalPort: 0, listener: '' }),
    startMs: Date.now(),
    chain: `CONNECT ${target}`,
  };
  const refuse = (status: number, reason: string) => {
    env.telemetry.accessLog({ time: isoTime(info.startMs), kind: 'tunnel', method: 'CONNECT', authority: target, status, listener: info.listener, reason });
    const text = status === 400 ? 'Bad Request' : status === 403 ? 'Forbidden' : 'Not Found';
    socket.end(`HTTP/1.1 ${status} ${text}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`);
  };
  const cand = connectCandidates(routes, target);
  if (!cand) return refuse(400, 'bad_request');
  const { bySni, byHost } = cand;
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
    const route = selectTunnelRoute(cand, hello.kind === 'tls' ? hello.sni : undefined)?.route;
    if (!route) {
      env.telemetry.accessLog({ time: isoTime(info.startMs), kind: 'tunnel', method: 'CONNECT', authority: target, sni: info.sni, listener: info.listener, reason: hello.kind === 'tls' ? 'no_sni_match' : 'not_tls' });
      socket.destroy();
      return;
    }
    proxyTcp(socket, hello.bytes, route.proxy, info, env);
  }, () => socket.destroy());
}
