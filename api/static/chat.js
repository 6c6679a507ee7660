// Chat page for DeFi Q&A Bot: asks over the WebSocket (/ws/ask) or SSE (/v2/ask-stream), shows words as they arrive.
"use strict";

const form = document.getElementById("ask-form");
const input = document.getElementById("question");
const transport = document.getElementById("transport");
const askButton = document.getElementById("ask-button");
const cancelButton = document.getElementById("cancel-button");
const statusLine = document.getElementById("status");
const conversation = document.getElementById("conversation");

let socket = null;
let sessionId = null;
let current = null; // the turn being streamed: {answer, meta, sources, words}
let sseController = null;

function setStatus(text) { statusLine.textContent = text; }

function newTurn(question) {
  const turn = document.createElement("article");
  turn.className = "turn";
  const q = document.createElement("div");
  q.className = "question";
  q.textContent = question;
  const answer = document.createElement("div");
  answer.className = "answer";
  answer.textContent = "Searching…";
  const meta = document.createElement("div");
  meta.className = "meta";
  const sources = document.createElement("ol");
  sources.className = "sources";
  turn.append(q, answer, meta, sources);
  conversation.prepend(turn);
  return { answer, meta, sources, words: [] };
}

function busy(isBusy) {
  askButton.disabled = isBusy;
  cancelButton.disabled = !isBusy;
}

function handleEvent(event) {
  if (!current) return;
  switch (event.type) {
    case "metadata":
      if (event.session_id) sessionId = event.session_id;
      current.answer.textContent = "";
      current.meta.textContent = "";
      for (const source of event.sources || []) {
        const item = document.createElement("li");
        item.textContent = `${source.question} (${source.score.toFixed(2)})`;
        current.sources.append(item);
      }
      break;
    case "word":
      if (event.content) {
        current.words.push(event.content);
        current.answer.textContent = current.words.join(" ");
      }
      break;
    case "complete": {
      const badge = document.createElement("span");
      badge.className = `badge ${event.processing_stage}`;
      badge.textContent = `confidence ${Number(event.final_confidence).toFixed(2)}`;
      const stage = document.createElement("span");
      stage.textContent = event.processing_stage;
      current.meta.replaceChildren(badge, stage);
      current.answer.dataset.done = "true";
      finish("Ready.");
      break;
    }
    case "error":
      current.answer.textContent = event.error || event.message || "Something went wrong.";
      current.answer.classList.add("error");
      finish("Ready.");
      break;
    default:
      break;
  }
}

function finish(text) {
  current = null;
  busy(false);
  setStatus(text);
}

function connectSocket() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/ask`);
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "status" && event.status === "connected") {
      sessionId = event.details.session_id;
      setStatus(`Connected (session ${sessionId.slice(0, 8)}).`);
    } else if (event.type === "heartbeat") {
      socket.send(JSON.stringify({ type: "heartbeat_response" }));
    } else {
      handleEvent(event);
    }
  };
  socket.onclose = () => {
    setStatus("WebSocket closed; reconnecting…");
    if (current) finish("Connection lost.");
    setTimeout(connectSocket, 2000);
  };
}

async function askOverSse(question) {
  sseController = new AbortController();
  const body = { question };
  if (sessionId) body.session_id = sessionId;
  try {
    const response = await fetch("/v2/ask-stream", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: sseController.signal,
    });
    if (!response.ok) {
      const error = await response.json();
      handleEvent({ type: "error", error: error.detail });
      return;
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) handleEvent(JSON.parse(line.slice(6)));
        }
      }
    }
    if (current) handleEvent({ type: "error", error: "Connection lost before the answer finished." });
  } catch (error) {
    if (current) handleEvent({ type: "error", error: error.name === "AbortError" ? "Stopped." : String(error) });
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = input.value.trim();
  if (!question || current) return;
  current = newTurn(question);
  busy(true);
  setStatus("Answering…");
  input.value = "";
  if (transport.value === "ws" && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "question", question }));
  } else {
    askOverSse(question);
  }
});

cancelButton.addEventListener("click", () => {
  if (transport.value === "ws" && socket) socket.send(JSON.stringify({ type: "cancel" }));
  if (sseController) sseController.abort();
});

connectSocket();
