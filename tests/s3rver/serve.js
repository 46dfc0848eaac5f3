// s3rver for the tests: the credentials the tests sign with (AWS_ACCESS_KEY_ID /
// AWS_SECRET_ACCESS_KEY, "testing" in tests/conftest.py) registered beside s3rver's
// own, files in a scratch directory, on 127.0.0.1:PORT. Prints "ready" once listening.
'use strict';
const path = require('path');
const modules = process.env.S3RVER_NODE_MODULES;
const S3rver = require(path.join(modules, 's3rver'));
const { DUMMY_ACCOUNT } = require(path.join(modules, 's3rver', 'lib', 'models', 'account'));

const [port, directory] = process.argv.slice(2);
DUMMY_ACCOUNT.createKeyPair(process.env.AWS_ACCESS_KEY_ID || 'testing', process.env.AWS_SECRET_ACCESS_KEY || 'testing');
const server = new S3rver({ address: '127.0.0.1', port: Number(port), directory, silent: true, vhostBuckets: false });
server.run().then(() => console.log('ready'), (err) => { console.error(err); process.exit(1); });
process.on('SIGTERM', () => server.close().then(() => process.exit(0)));
