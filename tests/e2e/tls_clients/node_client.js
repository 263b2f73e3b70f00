// A CRM connector on Node.js's https module (Node carries its own OpenSSL when
// the binary exports SSL_write; Debian's own nodejs links the system libssl).
// usage: node node_client.js IP SNI BODY: prints "started", waits for a line on
// stdin, posts BODY to https://IP/ naming SNI, prints "sent" after a 200, and
// keeps the connection open until stdin ends.
"use strict";
const https = require("https");
const readline = require("readline");
const [ip, sni, body] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin });
const agent = new https.Agent({ keepAlive: true });
let step = 0;
console.log("started");
lines.on("line", () => {
  if (step++ > 0) return;
  const req = https.request({
    host: ip, port: 443, method: "POST", path: "/services/data/v59.0/sobjects/Account",
    servername: sni, rejectUnauthorized: false, agent,
    headers: { Host: sni, "Content-Type": "application/json",
               "Content-Length": Buffer.byteLength(body) },
  }, (res) => {
    res.resume();
    res.on("end", () => {
      if (res.statusCode !== 200) { console.error("status", res.statusCode); process.exit(1); }
      console.log("sent");
    });
  });
  req.on("error", (e) => { console.error(e.message); process.exit(1); });
  req.end(body);
});
lines.on("close", () => { agent.destroy(); process.exit(step > 0 ? 0 : 1); });
