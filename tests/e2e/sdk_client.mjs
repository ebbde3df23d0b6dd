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

// ---- tools. The tiny fixture has random weights: a call is driven by an assistant
// prefill holding it (continue_final_message, a kvd/vLLM extension field the SDK passes
// through), with the model's next greedy token made a stop token so the turn ends at
// once. The SDK then sees what a real model's call looks like (test_tools.py covers
// the server side). ----
const weatherTool = {
  type: 'function',
  function: {
    name: 'get_weather', description: 'Current weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const callText = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
const askWeather = [{ role: 'user', content: 'What is the weather in Paris?' }];
const prefill = [...askWeather, { role: 'assistant', content: callText }];
let stopId = null;
async function forcedCall(model) {
  if (stopId === null) {
    const probe = await client.chat.completions.create({
      model, messages: prefill, tools: [weatherTool], continue_final_message: true, max_tokens: 1,
      logprobs: true, return_tokens_as_token_ids: true, temperature: 0,
    });
    stopId = Number(probe.choices[0].logprobs.content[0].token.split(':')[1]);
  }
  return { model, messages: prefill, tools: [weatherTool], continue_final_message: true, stop_token_ids: [stopId],
    max_tokens: 6, temperature: 0 };
}

check('tools: create returns tool_calls and a tool answer round-trips', async () => {
  const model = (await client.models.list()).data[0].id;
  const r = await client.chat.completions.create(await forcedCall(model));
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  const msg = r.choices[0].message;
  assert.equal(msg.content, null);
  assert.equal(msg.tool_calls.length, 1);
  const call = msg.tool_calls[0];
  assert.equal(call.type, 'function');
  assert.ok(call.id.startsWith('call_'));
  assert.equal(call.function.name, 'get_weather');
  assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris' });
  // the assistant message as the SDK returned it, then the tool's answer
  const answer = await client.chat.completions.create({
    model, tools: [weatherTool], max_tokens: 4, temperature: 0,
    messages: [...askWeather, msg, { role: 'tool', tool_call_id: call.id, content: '{"sky": "clear"}' }],
  });
  assert.equal(answer.choices[0].message.role, 'assistant');
  assert.equal(typeof answer.choices[0].message.content, 'string');
  assert.equal(answer.usage.completion_tokens, answer.choices[0].finish_reason === 'length' ? 4 : answer.usage.completion_tokens);
});

check('tools: the stream helper assembles the streamed call', async () => {
  const model = (await client.models.list()).data[0].id;
  const runner = client.chat.completions.stream(await forcedCall(model));
  const names = [];
  runner.on('tool_calls.function.arguments.done', (e) => names.push(e.name));
  const final = await runner.finalChatCompletion();
  const call = final.choices[0].message.tool_calls[0];
  assert.equal(final.choices[0].finish_reason, 'tool_calls');
  assert.equal(call.function.name, 'get_weather');
  assert.ok(call.id.startsWith('call_'));
  assert.deepEqual(JSON.parse(call.function.arguments), { city: 'Paris' });
  assert.deepEqual(names, ['get_weather']);
});

check('tools: runTools calls the function and sends its answer back', async () => {
  const model = (await client.models.list()).data[0].id;
  const params = await forcedCall(model);
  // runTools' parse helpers refuse an answer cut by max_tokens, so the second round
  // must stop by itself too: its first greedy token becomes a stop token as well (the
  // Qwen2.5 template does not render call ids, so that round's prompt is known).
  const result = { sky: 'clear', celsius: 21 };
  const round2 = [...prefill,
    { role: 'assistant', content: null, tool_calls: [{ id: 'x', type: 'function',
      function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: 'x', content: JSON.stringify(result) }];
  const probe = await client.chat.completions.create({
    model, messages: round2, tools: [weatherTool], continue_final_message: true, max_tokens: 1,
    logprobs: true, return_tokens_as_token_ids: true, temperature: 0,
  });
  params.stop_token_ids.push(Number(probe.choices[0].logprobs.content[0].token.split(':')[1]));
  const seen = [];
  const runner = client.chat.completions.runTools({
    ...params,
    tools: [{
      type: 'function',
      function: {
        ...weatherTool.function,
        parse: JSON.parse,
        function: (args) => { seen.push(args); return result; },
      },
    }],
  }, { maxChatCompletions: 3 });
  const final = await runner.finalChatCompletion();
  assert.deepEqual(seen, [{ city: 'Paris' }]);
  const toolMsg = runner.messages.find((m) => m.role === 'tool');
  assert.ok(toolMsg, 'runTools sent the tool answer');
  assert.deepEqual(JSON.parse(toolMsg.content), { sky: 'clear', celsius: 21 });
  // the second round continued no prefill: the model answered in plain text
  assert.ok(!final.choices[0].message.tool_calls || final.choices[0].message.tool_calls.length === 0);
  assert.equal(typeof final.choices[0].message.content, 'string');
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
