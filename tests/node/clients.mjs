// Real JavaScript LLM clients against the fake provider behind the middleware (tests/llm_provider.py).
// Usage: node clients.mjs http://127.0.0.1:PORT — prints one JSON line with what each client got.
import OpenAI from "openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";

const base = process.argv[2];
const messages = [{ role: "user", content: "Say hello" }];
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "sk-test", maxRetries: 0 });
const report = {};

// The loop from openai-node's README.
let text = "";
const stream = await client.chat.completions.create({ model: "m", messages, stream: true });
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content || "";
report.chat_stream_text = text;

// The stream helper, which iterates every chunk's choices.
const helper = client.chat.completions.stream({ model: "m", messages });
report.chat_stream_helper_text = (await helper.finalChatCompletion()).choices[0].message.content;

// Responses: finalResponse() throws on any event it does not know.
const responses = client.responses.stream({ model: "m", input: "Say hello" });
report.responses_final_text = (await responses.finalResponse()).output_text;

// The trace ID, read from the headers as the README says.
const { response } = await client.chat.completions.create({ model: "m", messages }).withResponse();
report.trace_id_from_with_response = response.headers.get("x-mlflow-trace-id");

// The Vercel AI SDK against the same OpenAI-compatible endpoint.
const provider = createOpenAICompatible({ name: "fake", baseURL: `${base}/v1`, apiKey: "sk-test" });
const result = streamText({ model: provider("m"), prompt: "Say hello", maxRetries: 0 });
const errorParts = [];
let aiText = "";
for await (const part of result.fullStream) {
  if (part.type === "error") errorParts.push(String(part.error));
  if (part.type === "text-delta") aiText += part.text ?? part.delta ?? part.textDelta ?? "";
}
report.ai_sdk_text = aiText;
report.ai_sdk_error_parts = errorParts;

const again = streamText({ model: provider("m"), prompt: "Say hello", maxRetries: 0 });
const uiErrors = [];
for await (const chunk of again.toUIMessageStream()) {
  if (chunk.type === "error") uiErrors.push(chunk.errorText ?? String(chunk));
}
report.ui_message_error_chunks = uiErrors;

console.log(JSON.stringify(report));
