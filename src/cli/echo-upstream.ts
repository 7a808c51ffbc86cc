/**
 * The demo's built-in upstream: answers every request with JSON describing what arrived
 * (method, path, headers), so a person can see what the gateway added (x-forwarded-*, XFCC).
 * `/status/<code>` answers with that status, as httpbin does.
 */
import * as http from 'node:http';

export function startEchoUpstream(port: number, host = '127.0.0.1'): Promise<http.Server> {
  const server = http.createServer((req, res) => {
    const m = /^\/status\/(\d{3})/.exec(req.url ?? '');
    const status = m ? Number(m[1]) : 200;
    let size = 0;
    req.on('data', (c: Buffer) => { size += c.length; });
    req.on('end', () => {
      const body = JSON.stringify({ method: req.method, url: req.url, httpVersion: req.httpVersion, headers: req.headers, bodyBytes: size }, null, 2) + '\n';
      res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  });
  server.on('clientError', (_e, s) => s.destroy());
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve(server));
  });
}
