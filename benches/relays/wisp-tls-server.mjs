// wisp-js's own server (`server_cli.mjs`) listens on plain HTTP only. The benches compare relays
// over TLS, as pages reach them, so this wraps the same `routeRequest` of the installed
// @mercuryworkshop/wisp-js package in node's HTTPS server; the Wisp protocol and the TCP proxying
// are entirely wisp-js's.
//
//   node wisp-tls-server.mjs HOST PORT CERT.pem KEY.pem '{"allow_private_ips":true}'
import https from "node:https";
import { readFileSync } from "node:fs";
import { server as wisp, logging } from "@mercuryworkshop/wisp-js/server";

const [host, port, cert, key, options] = process.argv.slice(2);
logging.set_level(logging.WARN);
for (const [name, value] of Object.entries(JSON.parse(options || "{}"))) {
  wisp.options[name] = value;
}
const server = https.createServer({ cert: readFileSync(cert), key: readFileSync(key) }, (req, res) => {
  res.writeHead(200, { "Content-Type": "text/plain" });
  res.end("wisp-js over TLS\n");
});
server.on("upgrade", (req, socket, head) => wisp.routeRequest(req, socket, head));
server.listen(parseInt(port, 10), host);
