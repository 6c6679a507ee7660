// Chat page for DeFi Q&A Bot: asks over the WebSocket (/ws/ask) or SSE (/v2/ask-stream), shows words as they arrive,
// and lets the reader rate each finished answer "helpful" or "wrong" (WebSocket `feedback` or POST /v2/feedback).
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
let current = null; // the turn being streamed: {turn, answer, meta, sources, words, socket, sessionId}
let sseController = null;
let pendingFeedback = []; // WebSocket feedback awaiting its reply, oldest first: {socket, resolve, reject}

const COMMENT_MAX_CHARS = 1000;

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
  return { turn, answer, meta, sources, words: [], socket: null, sessionId: null };
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
      current.sessionId = event.session_id || sessionId;
      current.answer.textContent = "";
      current.meta.textContent = "";
      for (const source of event.sources || []) {
        const item = document.createElement("li");
        item.textContent = `${source.question} (${source.score.toFixed(2)})`;
        if (source.id) item.dataset.entryId = source.id;
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
      if (event.answer_id) current.meta.after(feedbackControl(current, event.answer_id));
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

// --- rating an answer -------------------------------------------------------------------------------------

// Whether a rating of this answer can go over the WebSocket: the answer came over the socket that is still open,
// in the session that socket still has, and no question is streaming on it (so the reply cannot be mistaken).
function canRateOverSocket(answer) {
  return (
    answer.socket !== null &&
    answer.socket === socket &&
    socket.readyState === WebSocket.OPEN &&
    answer.sessionId === sessionId &&
    !(current && current.socket === socket)
  );
}

function rateOverSocket(answer, body) {
  return new Promise((resolve, reject) => {
    pendingFeedback.push({ socket: answer.socket, resolve, reject });
    answer.socket.send(JSON.stringify({ type: "feedback", ...body }));
  });
}

async function rateOverHttp(answer, body) {
  const sessionOfAnswer = answer.sessionId || sessionId;
  const payload = sessionOfAnswer ? { ...body, session_id: sessionOfAnswer } : body;
  let response;
  try {
    response = await fetch("/v2/feedback", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
  } catch (error) {
    throw new Error("Could not reach the server.");
  }
  let reply = null;
  try {
    reply = await response.json();
  } catch (error) {
    reply = null;
  }
  if (!response.ok) throw new Error((reply && reply.detail) || `Not recorded (HTTP ${response.status}).`);
  return reply;
}

// A reply to the oldest WebSocket feedback still waiting (the server answers each one, in order).
function settleFeedback(event) {
  const waiting = pendingFeedback.shift();
  if (!waiting) return;
  if (event.type === "feedback_recorded") waiting.resolve(event);
  else waiting.reject(new Error(event.message || event.error || "Not recorded."));
}

function failPendingFeedback(closed) {
  const failed = pendingFeedback.filter((waiting) => waiting.socket === closed);
  pendingFeedback = pendingFeedback.filter((waiting) => waiting.socket !== closed);
  for (const waiting of failed) waiting.reject(new Error("Connection lost; try again."));
}

function makeButton(text, className, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = text;
  button.setAttribute("aria-pressed", "false");
  button.setAttribute("aria-label", label);
  return button;
}

// The "Helpful" / "Wrong" control under a finished answer. Ratings of one answer are sent one after another,
// so the last click is the rating the server keeps; "Wrong" also opens an optional comment box.
function feedbackControl(answer, answerId) {
  const group = document.createElement("div");
  group.className = "feedback";
  group.setAttribute("role", "group");
  group.setAttribute("aria-label", "Rate this answer");
  group.dataset.answerId = answerId;

  const prompt = document.createElement("span");
  prompt.className = "feedback-prompt";
  prompt.textContent = "Rate this answer:";
  const helpful = makeButton("Helpful", "feedback-helpful", "Rate this answer helpful");
  const wrong = makeButton("Wrong", "feedback-wrong", "Rate this answer wrong");
  helpful.dataset.rating = "helpful";
  wrong.dataset.rating = "wrong";
  const status = document.createElement("span");
  status.className = "feedback-status";
  status.setAttribute("role", "status");

  const commentForm = document.createElement("form");
  commentForm.className = "feedback-comment";
  commentForm.hidden = true;
  const commentId = `comment-${answerId}`;
  const commentLabel = document.createElement("label");
  commentLabel.htmlFor = commentId;
  commentLabel.textContent = "What was wrong? (optional)";
  const comment = document.createElement("textarea");
  comment.id = commentId;
  comment.rows = 2;
  comment.maxLength = COMMENT_MAX_CHARS;
  const counter = document.createElement("span");
  counter.className = "feedback-counter muted";
  counter.setAttribute("aria-live", "polite");
  const sendComment = document.createElement("button");
  sendComment.type = "submit";
  sendComment.className = "feedback-send";
  sendComment.textContent = "Send";
  sendComment.setAttribute("aria-label", "Send comment");
  commentForm.append(commentLabel, comment, counter, sendComment);

  const buttons = [helpful, wrong];
  let confirmed = null; // the rating the server last recorded
  let latest = 0; // number of the newest request, so only its outcome shows
  let queue = Promise.resolve();

  function press(rating) {
    for (const button of buttons) button.setAttribute("aria-pressed", String(button.dataset.rating === rating));
  }

  function showStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function updateCounter() {
    counter.textContent = `${comment.value.length}/${COMMENT_MAX_CHARS}`;
  }

  function send(rating, text) {
    const body = { answer_id: answerId, rating };
    if (text) body.comment = text;
    const number = ++latest;
    press(rating);
    showStatus("Sending…", false);
    queue = queue
      .then(() => (canRateOverSocket(answer) ? rateOverSocket(answer, body) : rateOverHttp(answer, body)))
      .then(
        () => {
          confirmed = rating;
          if (number !== latest) return;
          showStatus(text ? "Thanks, comment sent." : `Thanks, recorded as ${rating}.`, false);
        },
        (error) => {
          if (number !== latest) return;
          press(confirmed);
          showStatus(error.message || "Not recorded.", true);
        },
      );
  }

  helpful.addEventListener("click", () => {
    commentForm.hidden = true;
    if (helpful.getAttribute("aria-pressed") !== "true") send("helpful");
  });
  wrong.addEventListener("click", () => {
    commentForm.hidden = false;
    if (wrong.getAttribute("aria-pressed") !== "true") send("wrong");
    comment.focus();
  });
  comment.addEventListener("input", updateCounter);
  comment.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) commentForm.requestSubmit();
  });
  commentForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = comment.value.trim();
    if (text.length > COMMENT_MAX_CHARS) {
      showStatus(`The comment is too long (at most ${COMMENT_MAX_CHARS} characters).`, true);
      return;
    }
    send("wrong", text);
  });
  updateCounter();

  group.append(prompt, helpful, wrong, status, commentForm);
  return group;
}

// --- asking ------------------------------------------------------------------------------------------------

function finish(text) {
  current = null;
  busy(false);
  setStatus(text);
}

function connectSocket() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const opened = new WebSocket(`${scheme}://${location.host}/ws/ask`);
  socket = opened;
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.type === "status" && event.status === "connected") {
      sessionId = event.details.session_id;
      setStatus(`Connected (session ${sessionId.slice(0, 8)}).`);
    } else if (event.type === "heartbeat") {
      socket.send(JSON.stringify({ type: "heartbeat_response" }));
    } else if (event.type === "feedback_recorded" || (event.type === "error" && pendingFeedback.length > 0)) {
      settleFeedback(event);
    } else {
      handleEvent(event);
    }
  };
  socket.onclose = () => {
    failPendingFeedback(opened);
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
    current.socket = socket;
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
