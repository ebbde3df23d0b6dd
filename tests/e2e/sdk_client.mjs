// sdk_client.mjs - the official OpenAI Node SDK (unmodified, pinned in package.json)
// against a running kvd: chat and completions, whole and streamed, models, and the
// SDK's typed errors. KVD_BASE_URL and KVD_API_KEY come from test_openai_sdk.py.
// Prints one line per check and "N passed, N failed"; exits non-zero on failure.
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const baseURL = process.env.KVD_BASE_URL;
const apiKey = process.env.KVD_API_KEY;
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60000 });
// Greedy and unpenalised, so streamed and whole answers must agree token for token.
const greedy = { temperature: 0, repetition_penalty: 1.0, ignore_eos: true };

const checks = [];
function check(name, fn) { checks.push([name, fn]); }

check('models.list', async () => {
  const page = await client.models.list();
  assert.equal(page.data.length, 1);
  assert.equal(page.data[0].object, 'model');
  assert.equal(typeof page.data[0].id, 'string');
});

check('chat.completions.create, whole and streamed, agree', async () => {
  const model = (await client.models.list()).data[0].id;
  const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Say hello.' }];
  const whole = await client.chat.completions.create({ model, messages, max_tokens: 12, ...greedy });
  assert.equal(whole.object, 'chat.completion');
  assert.ok(whole.id.startsWith('chatcmpl-'));
  assert.equal(whole.choices.length, 1);
  assert.equal(whole.choices[0].message.role, 'assistant');
  assert.equal(whole.choices[0].finish_reason, 'length');
  assert.equal(whole.usage.completion_tokens, 12);
  assert.equal(whole.usage.total_tokens, whole.usage.prompt_tokens + 12);

  const stream = await client.chat.completions.create({
    model, messages, max_tokens: 12, stream: true, stream_options: { include_usage: true }, ...greedy,
  });
  let text = '';
  let role = null;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      if (choice.delta.role) role = choice.delta.role;
      text += choice.delta.content ?? '';
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  assert.equal(role, 'assistant');
  assert.equal(finish, 'length');
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(usage.completion_tokens, 12);
});

check('chat stream helper (runner) collects the same text', async () => {
  const model = (await client.models.list()).data[0].id;
  const messages = [{ role: 'user', content: 'Count to three.' }];
  const whole = await client.chat.completions.create({ model, messages, max_tokens: 8, ...greedy });
  const runner = client.chat.completions.stream({ model, messages, max_tokens: 8, ...greedy });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, whole.choices[0].message.content);
});

check('completions.create, whole and streamed, agree', async () => {
  const model = (await client.models.list()).data[0].id;
  const whole = await client.completions.create({ model, prompt: 'Hello, my name is', max_tokens: 10, ...greedy });
  assert.equal(whole.object, 'text_completion');
  assert.ok(whole.id.startsWith('cmpl-'));
  assert.equal(whole.usage.prompt_tokens, 5);
  assert.equal(whole.usage.completion_tokens, 10);
  const stream = await client.completions.create({
    model, prompt: 'Hello, my name is', max_tokens: 10, stream: true, ...greedy,
  });
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    text += chunk.choices[0].text;
    if (chunk.choices[0].finish_reason) finish = chunk.choices[0].finish_reason;
  }
  assert.equal(text, whole.choices[0].text);
  assert.equal(finish, 'length');
});

check('completions with logprobs', async () => {
  const model = (await client.models.list()).data[0].id;
  const r = await client.completions.create({ model, prompt: 'Hi', max_tokens: 3, logprobs: 2, ...greedy });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 3);
  assert.equal(lp.tokens.join(''), r.choices[0].text);
  assert.ok(lp.token_logprobs.every((x) => x <= 0));
});

check('errors arrive as the SDK\'s typed errors', async () => {
  const model = (await client.models.list()).data[0].id;
  await assert.rejects(
    client.chat.completions.create({ model, messages: [{ role: 'wizard', content: 'x' }] }),
    (err) => err instanceof OpenAI.BadRequestError && err.status === 400 && err.param === 'messages[0].role');
  await assert.rejects(
    client.completions.create({ model, prompt: 'x', max_tokens: -5 }),
    (err) => err instanceof OpenAI.BadRequestError && err.param === 'max_tokens');
  const stranger = new OpenAI({ baseURL, apiKey: 'wrong-key', maxRetries: 0 });
  await assert.rejects(stranger.models.list(),
    (err) => err instanceof OpenAI.AuthenticationError && err.status === 401);
});

let passed = 0;
let failed = 0;
for (const [name, fn] of checks) {
  try {
    await fn();
    passed++;
    console.log(`ok   ${name}`);
  } catch (err) {
    failed++;
    console.log(`FAIL ${name}\n${err.stack || err}`);
  }
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
