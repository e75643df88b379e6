#!/usr/bin/env node
'use strict';
/**
 * featureviz-node: a tiny command line over the Node client. It only parses arguments and calls the Client.
 *
 *     featureviz-node [--server HOST:PORT] [--token TOKEN] [--tls-ca PEM [--client-cert PEM --client-key PEM]]
 *                     COMMAND ...
 *       info                                  server version, device, limits
 *       upload FILE.onnx [--name NAME]        upload a model, print its sha256
 *       layers MODEL [--filter S] [--spatial] the layer catalog: name, op, shape, channels
 *       render MODEL LAYER:C|logit:K [job options] [--out DIR]
 *                                             optimise an image for channel C of LAYER (or class K), write
 *                                             PNGs to DIR; the job options are `featureviz render`'s flags
 *                                             (JOB_FLAGS; --help lists them with the proto enums' choices)
 *
 * MODEL is a sha256 or a path to an .onnx file (uploaded first). --server defaults to $FEATUREVIZ_SERVER or
 * 127.0.0.1:50051, --token to $FEATUREVIZ_TOKEN, --tls-ca to $FEATUREVIZ_TLS_CA (a PEM CA: use TLS; client
 * certificates for mTLS servers). Errors end with one line on stderr and exit status 1 (2 for
 * usage errors); Ctrl-C during a render cancels the job.
 */

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const { Client, FeaturevizError, enumChoices, loadContract } = require('./index');

class UsageError extends Error {}

function integer(value, flag) {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value)) {
    throw new UsageError(`--${flag} expects a non-negative integer, got ${JSON.stringify(value)}`);
  }
  return Number(value);
}

function number(value, flag) {
  if (value === undefined) return undefined;
  const parsed = Number(value);
  if (value.trim() === '' || !Number.isFinite(parsed)) {
    throw new UsageError(`--${flag} expects a number, got ${JSON.stringify(value)}`);
  }
  return parsed;
}

const text = (value) => value; // an enum name (checked by toJobSpec against the proto's enum) or a model
const flag = (value) => value;

/**
 * render's job options: flag -> [JobSpec field, parser, metavar]. The flags are `featureviz render`'s, from the
 * declaration of the job options (featureviz.options; tests/node/options.test.js checks this table against it);
 * an enum's choices come from the loaded proto (enumChoices), never from a copy.
 */
const JOB_FLAGS = {
  steps: ['steps', integer, 'N'],
  lr: ['lr', number, 'X'],
  size: ['size', integer, 'S'],
  batch: ['batch', integer, 'B'],
  seed: ['seed', integer, 'K'],
  param: ['param', text],
  decay: ['decay', number, 'X'],
  transforms: ['transforms', text],
  init: ['initImage', (value) => fs.readFileSync(value), 'IMAGE'],
  exclusive: ['exclusive', flag],
  judge: ['judge', text, 'MODEL'],
  schedule: ['lrSchedule', text],
  warmup: ['lrWarmup', integer, 'N'],
  'stop-at-plateau': ['plateau', number, 'GAIN'],
  'plateau-window': ['plateauWindow', integer, 'N'],
  prior: ['priorDataset', text, 'DATASET'],
  generator: ['generator', text, 'GEN'], // with --param generator (and --latent-l2 X): a generator's sha256 or file
};

/** `[--param fft|pixel|...]` for each job flag, enum choices read from the loaded contract. */
function jobFlagsUsage() {
  const fields = loadContract().JobSpec.type.field;
  return Object.entries(JOB_FLAGS).map(([name, [field, parse, metavar]]) => {
    if (parse === flag) return `[--${name}]`;
    const fd = fields.find((f) => f.name === field);
    const value = fd && fd.type === 'TYPE_ENUM' ? Object.keys(enumChoices(fd.typeName)).join('|') : metavar;
    return `[--${name} ${value}]`;
  });
}

function usage() {
  const flags = jobFlagsUsage();
  const lines = [];
  for (const item of flags) {
    if (!lines.length || lines[lines.length - 1].length + item.length > 100) lines.push('         ');
    lines[lines.length - 1] += ` ${item}`;
  }
  return `usage: featureviz-node [--server HOST:PORT] [--token TOKEN]
                       [--tls-ca PEM [--client-cert PEM --client-key PEM]] COMMAND ...

commands:
  info                                    server version, device and limits
  upload FILE.onnx [--name NAME]          upload a model and print its sha256
  layers MODEL [--filter S] [--spatial]   list the layer catalog
  render MODEL LAYER:C|logit:K [--out DIR]
${lines.join('\n')}
                                          render channel C of LAYER (or class K) and write PNGs to DIR
                                          (default .); --judge: a classifier that ranks the class in each image;
                                          --schedule: the learning rate's decay; --stop-at-plateau: stop once
                                          the objective gains less than GAIN (relative) over a window;
                                          --exclusive: never share a device step (bitwise repeatable);
                                          --prior: learn the colour matrix and spectrum decay from a dataset
                                          --generator (with --param generator, --latent-l2 X): optimise the
                                          latents of this uploaded generator instead of pixels

MODEL is a sha256 or a path to an .onnx file (uploaded first).
--server defaults to $FEATUREVIZ_SERVER or 127.0.0.1:50051; --token to $FEATUREVIZ_TOKEN.
--tls-ca (default $FEATUREVIZ_TLS_CA) connects with TLS, verifying the server against that CA; add
--client-cert and --client-key for servers that require client certificates (mTLS).`;
}

const OPTIONS = {
  server: { type: 'string' },
  token: { type: 'string' },
  'tls-ca': { type: 'string' },
  'client-cert': { type: 'string' },
  'client-key': { type: 'string' },
  name: { type: 'string' },
  filter: { type: 'string' },
  spatial: { type: 'boolean' },
  ...Object.fromEntries(Object.entries(JOB_FLAGS).map(([name, [, parse]]) =>
    [name, { type: parse === flag ? 'boolean' : 'string' }])),
  'latent-l2': { type: 'string' }, // a part of --generator (JobSpec.generator.latent_l2)
  out: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

function positionals(args, count, usage) {
  if (args.length !== count) throw new UsageError(`expected: ${usage}`);
  return args;
}

/** "LAYER:C" -> {layer, channel}; the last colon splits, so layer names may contain colons. */
function parseTarget(text) {
  const cls = /^(logit|prob):(\d+)$/.exec(text);
  if (cls) return { kind: cls[1], index: Number(cls[2]) };
  const at = text.lastIndexOf(':');
  if (at <= 0 || !/^\d+$/.test(text.slice(at + 1))) {
    throw new UsageError(`expected LAYER:CHANNEL (e.g. /conv1/Conv:3), got ${JSON.stringify(text)}`);
  }
  return { layer: text.slice(0, at), channel: Number(text.slice(at + 1)) };
}

async function resolveModel(fv, model) {
  if (fs.existsSync(model) && fs.statSync(model).isFile()) return (await fv.uploadModel(model)).sha256;
  return model;
}

const COMMANDS = {
  async info(fv, args) {
    positionals(args, 0, 'info');
    const info = await fv.serverInfo();
    const { limits, device } = info;
    console.log(`featureviz ${info.version} (api ${info.apiVersion}) at ${fv.address}, tenant ${info.tenant}`);
    console.log(`device: ${device.kind} ${device.name}, kernels ${device.kernels}`);
    const batch = limits.maxImagesPerJob || limits.maxBatch;  // maxBatch: the deprecated name (older servers)
    console.log(`limits: image side ${limits.maxImageSide}, steps ${limits.maxSteps}, batch ${batch}, ` +
      `upload ${limits.maxUploadBytes} bytes`);
    for (const w of info.workers || []) {
      console.log(`worker ${w.id} on ${w.node} (pid ${w.pid}, ${w.device ? w.device.kind : '?'}${w.up ? '' : ', restarting'}): ` +
        `${w.activeSlots} active, ${(w.models || []).length} model(s)`);
    }
  },

  async upload(fv, args, opts) {
    const [file] = positionals(args, 1, 'upload FILE.onnx [--name NAME]');
    const model = await fv.uploadModel(file, { name: opts.name });
    const { inputSpec } = model;
    const note = model.deduplicated ? ' (already stored)' : '';
    console.error(`${model.displayName || file}: ${model.layerCount} layers, input ${inputSpec.layout} ` +
      `${inputSpec.channels}x${inputSpec.defaultHeight}x${inputSpec.defaultWidth}${note}`);
    console.log(model.sha256);
  },

  async layers(fv, args, opts) {
    const [model] = positionals(args, 1, 'layers MODEL [--filter S] [--spatial]');
    const sha = await resolveModel(fv, model);
    for await (const layer of fv.listLayers(sha, { filter: opts.filter || '', spatialOnly: Boolean(opts.spatial) })) {
      console.log([layer.name, layer.opType, `[${layer.shape.join(',')}]`, layer.channels].join('\t'));
    }
  },

  async render(fv, args, opts) {
    const [model, target] = positionals(args, 2, 'render MODEL LAYER:C|logit:K [--steps N] [--size S] [--out DIR]');
    const parsed = parseTarget(target);
    const { layer, channel } = parsed;
    const options = {}; // usage errors before any upload
    for (const [name, [field, parse]] of Object.entries(JOB_FLAGS)) {
      if (opts[name] !== undefined) options[field] = parse(opts[name], name);
    }
    if (options.exclusive === false) delete options.exclusive;
    const sha = await resolveModel(fv, model);
    if (options.judge !== undefined) options.judge = await resolveModel(fv, options.judge);
    if (opts['latent-l2'] !== undefined && options.generator === undefined) {
      throw new UsageError('--latent-l2 goes with --generator');
    }
    if (options.generator !== undefined) { // uploaded first when it is a file, like the model
      options.generator = { model: await resolveModel(fv, options.generator) };
      if (opts['latent-l2'] !== undefined) options.generator.latentL2 = number(opts['latent-l2'], 'latent-l2');
    }
    const job = await fv.createJob({
      model: sha,
      objective: parsed.kind ? { [parsed.kind]: { index: parsed.index } } : { channel: { layer, channel } },
      ...options,
    });
    const onInterrupt = () => {
      process.stderr.write(`\ncancelling job ${job.id}\n`);
      fv.cancelJob(job).catch(() => {}).finally(() => process.exit(130));
    };
    process.once('SIGINT', onInterrupt);
    try {
      const done = await fv.waitJob(job, {
        onEvent(event) {
          if (event.event === 'progress') {
            const { step, steps, objective } = event.progress;
            const values = objective.map((v) => v.toFixed(4)).join(' ');
            process.stderr.write(`\rjob ${job.id}: step ${step}/${steps} objective ${values}`);
          }
        },
      });
      process.stderr.write('\n');
      if (done.state !== 'JOB_STATE_SUCCEEDED') {
        const why = done.error && done.error.message ? `: ${done.error.code} ${done.error.message}` : '';
        const codeName = (done.error && done.error.code) || 'CANCELLED';
        throw new FeaturevizError(grpc.status[codeName] ?? grpc.status.UNKNOWN, codeName,
          `job ${job.id} ended ${done.state.replace('JOB_STATE_', '')}${why}`);
      }
      const { images, objectiveDescription, secondsPerStep } = done.result;
      const change = images.map((i) => `${i.objectiveStart.toFixed(4)} -> ${i.objectiveEnd.toFixed(4)}`).join(', ');
      process.stderr.write(`${objectiveDescription || 'objective'}: ${change} ` +
        `(${done.result.stepsDone} steps` +
        `${done.result.stoppedAt ? `, stopped at a plateau after step ${done.result.stoppedAt}` : ''}, ` +
        `${(1000 * secondsPerStep).toFixed(1)} ms/step` +
        `${done.worker ? `, worker ${done.worker}` : ''})\n`);
      const outDir = opts.out || '.';
      fs.mkdirSync(outDir, { recursive: true });
      const stem = parsed.kind ? `${parsed.kind}_${parsed.index}`
        : `${layer.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^_+|_+$/g, '')}_${channel}`;
      for (const image of images) {
        if (image.judge && image.judge.rank > 0) {
          process.stderr.write(`image ${image.index}: judge rank ${image.judge.rank} of class ${image.judge.target}, ` +
            `p ${Number(image.judge.probability).toFixed(3)}\n`);
        }
        const file = path.join(outDir, `${stem}_${image.index}.png`);
        fs.writeFileSync(file, image.png);
        console.log(file);
      }
    } finally {
      process.removeListener('SIGINT', onInterrupt);
    }
  },
};

async function main(argv) {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  } catch (err) {
    console.error(`featureviz-node: error: ${err.message}\n\n${usage()}`);
    return 2;
  }
  const { values: opts, positionals: args } = parsed;
  const [command, ...rest] = args;
  if (opts.help || !command) {
    console.log(usage());
    return command || opts.help ? 0 : 2;
  }
  if (!COMMANDS[command]) {
    console.error(`featureviz-node: error: unknown command ${JSON.stringify(command)}\n\n${usage()}`);
    return 2;
  }
  const address = opts.server || process.env.FEATUREVIZ_SERVER || '127.0.0.1:50051';
  let fv;
  try {
    fv = new Client(address, {
      token: opts.token || process.env.FEATUREVIZ_TOKEN,
      rootCerts: opts['tls-ca'] || process.env.FEATUREVIZ_TLS_CA || undefined,
      clientCert: opts['client-cert'],
      clientKey: opts['client-key'],
    });
    await COMMANDS[command](fv, rest, opts);
    return 0;
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`featureviz-node ${command}: error: ${err.message}`);
      return 2;
    }
    if (err instanceof FeaturevizError || err.code === 'ENOENT' || err.code === 'EACCES') {
      console.error(`featureviz-node ${command}: error: ${err.message}`);
      return 1;
    }
    throw err;
  } finally {
    if (fv) fv.close();
  }
}

if (require.main === module) {
  // grpc-js sets the TLS server name to the address even when it is an IP (DEP0123): noise for CLI users
  process.noDeprecation = true;
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
}

module.exports = { main, parseTarget, JOB_FLAGS };
