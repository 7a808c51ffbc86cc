// One HTTP/2 request on a session of its own, as the gRPC-shaped tests make them.
import http2 from 'node:http2';

export interface H2Response {
  status: number;
  headers: http2.IncomingHttpHeaders;
  trailers: http2.IncomingHttpHeaders;
  body: Buffer;
}

/**
 * Opens a session to `origin` (`http://…` is h2c with prior knowledge, `https://…` TLS with
 * `connect` options such as ca and servername), sends one request and collects the response,
 * its trailers and up to `maxChunks` body chunks. Rejects on a stream or session error, or after
 * `timeoutMs`.
 */
export function h2Request(
  origin: string, connect: http2.SecureClientSessionOptions, headers: http2.OutgoingHttpHeaders,
  body?: Buffer, opts: { timeoutMs?: number; maxChunks?: number } = {},
): Promise<H2Response> {
  return new Promise((resolve, reject) => {
    const session = http2.connect(origin, connect);
    const timer = setTimeout(() => { session.destroy(); reject(new Error(`HTTP/2 request to ${origin} timed out`)); }, opts.timeoutMs ?? 15_000);
    timer.unref();
    session.on('error', (e) => { clearTimeout(timer); reject(e); });
    const req = session.request(headers);
    let head: http2.IncomingHttpHeaders = {}, trailers: http2.IncomingHttpHeaders = {};
    const chunks: Buffer[] = [];
    const max = opts.maxChunks ?? Infinity;
    req.on('response', (h) => { head = h; });
    req.on('trailers', (t) => { trailers = t; });
    req.on('data', (c: Buffer) => { if (chunks.length < max) chunks.push(c); });
    req.on('error', (e) => { clearTimeout(timer); session.destroy(); reject(e); });
    req.on('end', () => {
      clearTimeout(timer);
      session.close();
      resolve({ status: Number(head[':status']), headers: head, trailers, body: Buffer.concat(chunks) });
    });
    req.end(body);
  });
}

/** A gRPC length-prefixed message (uncompressed) holding `text`. */
export function grpcFrame(text: string): Buffer {
  const msg = Buffer.from(text);
  const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, 0]), msg]);
  frame.writeUInt32BE(msg.length, 1);
  return frame;
}
