// Drives one Node amqplib connection for tests/lib/clients.py (NodeAmqplibClient).
// Commands arrive as JSON lines on stdin ({id, op, ...}); each is answered by a JSON line
// on stdout ({id, ok} or {id, error: {kind, detail}}); events ({event, ...}) say that the
// connection is up (with its local port), that a message was delivered, or that the
// connection is gone.
'use strict';
const path = require('path');
const readline = require('readline');
const amqp = require(path.join(__dirname, '..', 'node', 'node_modules', 'amqplib'));

const [host, port, user, password, vhost, heartbeat, name] = process.argv.slice(2);
const channels = new Map();
let conn = null;
let lost = null;

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function kindOf(err) {
  return lost !== null ? 'connection' : 'channel';
}

async function handle(cmd) {
  switch (cmd.op) {
    case 'channel': {
      const ch = await conn.createChannel();
      ch.on('error', () => {}); // the pending call gets the error; nothing else to do
      ch.on('close', () => channels.delete(ch.ch));
      channels.set(ch.ch, ch);
      return ch.ch;
    }
    case 'consume': {
      const ch = channels.get(cmd.channel);
      if (!ch) throw new Error('channel ' + cmd.channel + ' is closed');
      const ok = await ch.consume(cmd.queue, () => send({ event: 'delivered' }), { noAck: true });
      return ok.consumerTag;
    }
    case 'cancel':
      // amqplib 0.10's cancel() resolves to nothing (its cancel-ok is not returned).
      await channels.get(cmd.channel).cancel(cmd.tag);
      return cmd.tag;
    case 'close_channel': {
      const ch = channels.get(cmd.channel);
      channels.delete(cmd.channel);
      await ch.close();
      return true;
    }
    case 'publish': {
      const ch = channels.get(cmd.channel);
      ch.sendToQueue(cmd.queue, Buffer.from(cmd.body, 'base64'));
      return true;
    }
    case 'close':
      await conn.close();
      return true;
    default:
      throw new Error('unknown op ' + cmd.op);
  }
}

async function main() {
  try {
    conn = await amqp.connect(
      { protocol: 'amqp', hostname: host, port: Number(port), username: user, password,
        vhost, heartbeat: Number(heartbeat) },
      { clientProperties: { connection_name: name } },
    );
  } catch (err) {
    send({ event: 'lost', detail: String(err) });
    process.exit(1);
  }
  conn.on('error', (err) => { lost = String(err); });
  conn.on('close', (err) => {
    if (lost === null) lost = err ? String(err) : 'closed';
    send({ event: 'lost', detail: lost });
  });
  send({ event: 'connected', local_port: conn.connection.stream.localPort });
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    const cmd = JSON.parse(line);
    handle(cmd).then(
      (ok) => send({ id: cmd.id, ok }),
      (err) => send({ id: cmd.id, error: { kind: kindOf(err), detail: String(err) } }),
    );
  });
  rl.on('close', () => process.exit(0));
}

main();
