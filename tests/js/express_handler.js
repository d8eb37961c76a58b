// Driven by tests/test_webpubsub_express.py: Microsoft's
// @azure/web-pubsub-express WebPubSubEventHandler, unchanged and with its
// default path (/api/webpubsub/hubs/{hub}/), as the event handler of the
// broker.  Prints one JSON line on stdout per request it handled (and
// {"event": "listening", "port": N} first).
//   connect: refused with 401 when the query has deny=1, else accepted
//            with userId from the query's user;
//   user events: "echo" answers "echo:<data>" as text; "fail" answers 500;
//                "slow" never answers.
// EXPRESS names the express module: "express" (4.x, what the middleware's
// samples use) or "express5" (package.json's alias for express 5.x, what
// `npm install express` gives a new project).
"use strict";
const expressModule = process.env.EXPRESS || "express";
const express = require(expressModule);
const { WebPubSubEventHandler } = require("@azure/web-pubsub-express");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const hub = process.argv[2] || "chat";

const handler = new WebPubSubEventHandler(hub, {
  handleConnect: (req, res) => {
    const q = req.queries || {};
    out({ event: "connect", connectionId: req.context.connectionId, query: q });
    if (q.deny && q.deny[0] === "1") {
      res.fail(401, "denied by the test");
      return;
    }
    res.success({ userId: q.user ? q.user[0] : "anonymous", groups: ["express"] });
  },
  onConnected: (req) => {
    out({ event: "connected", connectionId: req.context.connectionId,
          userId: req.context.userId });
  },
  onGroupJoined: (req) => {
    out({ event: "groupJoined", connectionId: req.context.connectionId, group: req.group });
  },
  onGroupLeft: (req) => {
    out({ event: "groupLeft", connectionId: req.context.connectionId, group: req.group });
  },
  onDisconnected: (req) => {
    out({ event: "disconnected", connectionId: req.context.connectionId,
          reason: req.reason });
  },
  handleUserEvent: (req, res) => {
    out({ event: "user", name: req.context.eventName, data: req.data,
          dataType: req.dataType, userId: req.context.userId });
    if (req.context.eventName === "fail") {
      res.fail(500, "failed by the test");
    } else if (req.context.eventName === "slow") {
      // never answers: the broker's event_timeout applies
    } else {
      res.success("echo:" + req.data, "text");
    }
  },
});

const app = express();
app.use((req, _res, next) => {
  if (req.method === "OPTIONS") {
    out({ event: "options", path: req.path });
  }
  next();
});
app.use(handler.getMiddleware());
const server = app.listen(0, "127.0.0.1", () => {
  out({ event: "listening", port: server.address().port, path: handler.path,
        express: require(expressModule + "/package.json").version });
});
process.stdin.on("end", () => server.close(() => process.exit(0)));
process.stdin.resume();
