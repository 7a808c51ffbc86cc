/**
 * TCP proxying for passthrough chains, TCP servers and TLS-terminated TCP: pick a weighted
 * cluster, connect (with the cluster's timeout, and upstream TLS when the cluster has it), replay
 * the bytes the listener already read, then relay both ways with backpressure (pipe), half-close
 * propagation and an idle timeout. One access-log entry per connection.
 */
import type * as net from 'node:net';
import type { TcpProxy, WeightedCluster } from '../../model/snapshot.js';
import type { ConnectionInfo } from '../connection-info.js';
import type { Reason, Telemetry } from '../telemetry.js';

export interface TcpConnector {
  connectTcp(cluster: string, opts: { timeoutMs?: number; sni?: string }): Promise<{ socket: net.Socket; endpoint: string }>;
}

export interface TcpProxyEnv {
  clusters: TcpConnector;
  telemetry: Telemetry;
}

/** Weighted pick over clusters (weights are small integers; no allocation). */
export function pickWeighted(list: readonly WeightedCluster[], rnd = Math.random): WeightedCluster | undefined {
  if (list.length === 1) return list[0];
  let total = 0;
  for (const w of list) total += w.weight;
  if (total <= 0) return undefined;
  let r = rnd() * total;
  for (const w of list) {
    r -= w.weight;
    if (r < 0) return w;
  }
  return list[list.length - 1];
}

export function proxyTcp(down: net.Socket, replay: Buffer | undefined, proxy: TcpProxy, info: ConnectionInfo, env: TcpProxyEnv): void {
  const { telemetry } = env;
  let up: net.Socket | undefined;
  let endpoint = '';
  let reason: Reason = 'ok';
  let done = false;
  let upBytesIn = 0; // bytes from upstream, for when `up` never existed
  const target = pickWeighted(proxy.clusters);
  const labels = { listener: info.listener };

  const finish = (why?: Reason) => {
    if (done) return;
    done = true;
    if (why && reason === 'ok') reason = why;
    down.destroy();
    up?.destroy();
    telemetry.gauge('downstream_connections_active', -1, labels);
    telemetry.accessLog({
      time: new Date(info.startMs).toISOString(),
      kind: 'tcp',
      downstream: `${info.downstreamRemoteAddress}:${info.downstreamRemotePort}`,
      listener: info.listener,
      chain: info.chain,
      sni: info.sni,
      ech: info.ech || undefined,
      alpn: info.alpn ?? info.alpnOffered?.join(','),
      tlsVersion: info.tlsVersion,
      peerSubject: info.peerCertificate?.subject?.replace(/\n/g, ','),
      route: proxy.name,
      cluster: target?.cluster,
      upstream: endpoint || undefined,
      bytesReceived: down.bytesRead,
      bytesSent: down.bytesWritten,
      upstreamBytesReceived: up ? up.bytesRead : upBytesIn,
      durationMs: Date.now() - info.startMs,
      reason,
    });
    telemetry.count('tcp_connections_total', { listener: info.listener, reason });
  };

  down.on('error', () => finish('downstream_reset'));
  down.on('close', () => finish());
  down.pause();
  telemetry.gauge('downstream_connections_active', 1, labels);

  if (!target) {
    finish('no_healthy_upstream');
    return;
  }
  const started = Date.now();
  env.clusters.connectTcp(target.cluster, {}).then(
    ({ socket, endpoint: ep }) => {
      endpoint = ep;
      up = socket;
      telemetry.observe('upstream_connect_seconds', (Date.now() - started) / 1000, { cluster: target.cluster });
      if (done) { socket.destroy(); return; }
      socket.on('error', () => finish('upstream_reset'));
      socket.on('close', () => finish());
      const idle = proxy.idleTimeoutMs;
      if (idle > 0) {
        const onIdle = () => finish('idle_timeout');
        down.setTimeout(idle, onIdle);
        socket.setTimeout(idle, onIdle);
      }
      if (replay && replay.length) socket.write(replay);
      // pipe() gives backpressure and, with end: true, forwards a FIN as a half-close.
      down.pipe(socket);
      socket.pipe(down);
      down.resume();
    },
    (err: Error & { code?: string; reason?: Reason }) => {
      telemetry.count('upstream_connect_errors_total', { cluster: target.cluster });
      finish(err.reason ?? (err.code === 'ETIMEDOUT' || err.code === 'UND_ERR_CONNECT_TIMEOUT' ? 'upstream_connect_timeout' : 'upstream_connect_failed'));
    },
  );
}
