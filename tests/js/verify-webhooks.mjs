// Verifies outbound webhook deliveries with the official Standard Webhooks
// library. stdin: {"secret":"whsec_…","deliveries":[{"headers":{…},"body":"…"}]}
// stdout: one JSON array, per delivery "ok" or the library's error message.
import { Webhook } from "standardwebhooks";

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const wh = new Webhook(input.secret);
const results = input.deliveries.map(({ headers, body }) => {
  try {
    wh.verify(body, headers);
    return "ok";
  } catch (e) {
    return String(e && e.message ? e.message : e);
  }
});
process.stdout.write(JSON.stringify(results));
