// Signs a webhook with a provider's own public signing function, for the
// interop tests (tests/it/ingest_interop.rs). Input on stdin, one JSON object:
//   {"kind": "stripe"|"github"|"standard", "secret": "...", "payload": "...",
//    "timestamp": <unix seconds>, "id": "<message id, standard only>"}
// Output on stdout: the headers to send, as one JSON object.
import Stripe from 'stripe';
import { sign } from '@octokit/webhooks-methods';
import { Webhook } from 'standardwebhooks';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));
const { kind, secret, payload, timestamp, id } = input;

let headers;
switch (kind) {
  case 'stripe': {
    const stripe = new Stripe('sk_test_interop');
    headers = {
      'stripe-signature': stripe.webhooks.generateTestHeaderString({ payload, secret, timestamp }),
    };
    break;
  }
  case 'github':
    headers = { 'x-hub-signature-256': await sign(secret, payload) };
    break;
  case 'standard':
    headers = {
      'webhook-id': id,
      'webhook-timestamp': String(timestamp),
      'webhook-signature': new Webhook(secret).sign(id, new Date(timestamp * 1000), payload),
    };
    break;
  default:
    console.error(`unknown kind ${kind}`);
    process.exit(2);
}
process.stdout.write(JSON.stringify(headers));
