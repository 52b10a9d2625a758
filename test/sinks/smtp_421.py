#!/usr/bin/python3
"""An SMTP server that takes one message per connection (used by
test/t/110_postfix.pl): the next MAIL on the same connection gets
"421 4.7.0 one message per connection" and the connection is closed, as a
server with a per-session message limit or an idle timeout does.

    smtp_421.py --dir DIR [--close]

--close: the second MAIL gets no answer at all, the connection is just
closed (a server that dropped an idle connection as the command arrived).

Listens on 127.0.0.1, a free port written to DIR/port; each accepted message
is appended to DIR/mail.jsonl ({"rcpt": [...], "connection": n, "bytes": n}).
"""
import argparse
import asyncio
import json
import os

connections = 0


async def session(reader, writer, args):
    global connections
    connections += 1
    conn = connections
    served = 0
    rcpt = []

    async def reply(line):
        writer.write((line + "\r\n").encode())
        await writer.drain()

    await reply("220 once.nocrm.test ESMTP")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.decode("utf-8", "replace").strip()
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                await reply("250-once.nocrm.test")
                await reply("250 8BITMIME")
            elif verb == "MAIL":
                if served:
                    if not args.close:
                        await reply("421 4.7.0 one message per connection")
                    break
                rcpt = []
                await reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt.append(cmd.split(":", 1)[1].strip())
                await reply("250 2.1.5 Ok")
            elif verb == "DATA":
                await reply("354 End data with <CR><LF>.<CR><LF>")
                size = 0
                while True:
                    data = await reader.readline()
                    if not data or data == b".\r\n":
                        break
                    size += len(data)
                if not data:
                    break  # the client went away before the end: no message
                served += 1
                with open(os.path.join(args.dir, "mail.jsonl"), "a") as f:
                    f.write(json.dumps({"rcpt": rcpt, "connection": conn, "bytes": size}) + "\n")
                await reply("250 2.0.0 Ok: queued")
            elif verb == "QUIT":
                await reply("221 2.0.0 Bye")
                break
            elif verb in ("RSET", "NOOP"):
                await reply("250 2.0.0 Ok")
            else:
                await reply("502 5.5.2 Error: command not recognized")
    finally:
        writer.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--close", action="store_true")
    args = p.parse_args()
    server = await asyncio.start_server(lambda r, w: session(r, w, args), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tmp = os.path.join(args.dir, "port.tmp")
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, os.path.join(args.dir, "port"))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
