// frameenc encodes muxado v1 frames with Debian's muxado frame package (the Go encoder the
// byte vectors of tests/test_frame.py are checked against). One request per stdin line, one
// answer per stdout line:
//
//	syn <id> <priority> <type> <fin 0|1>    ->  ok <hex of the frame> | err <message>
//	data <id> <hex payload or -> <fin 0|1>
//	rst <id> <code>
//	wndinc <id> <increment>
//	goaway <last id> <code> <hex debug or ->
package main

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/inconshreveable/muxado/proto/frame"
)

type buffer struct{ bytes.Buffer }

func (b *buffer) Close() error { return nil }

func num(s string) uint32 {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		panic(err)
	}
	return uint32(n)
}

func blob(s string) []byte {
	if s == "-" {
		return nil
	}
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

func build(f []string) (frame.WFrame, error) {
	switch f[0] {
	case "syn":
		w := frame.NewWStreamSyn()
		return w, w.Set(frame.StreamId(num(f[1])), frame.StreamPriority(num(f[2])),
			frame.StreamType(num(f[3])), f[4] == "1")
	case "data":
		w := frame.NewWStreamData()
		return w, w.Set(frame.StreamId(num(f[1])), blob(f[2]), f[3] == "1")
	case "rst":
		w := frame.NewWStreamRst()
		return w, w.Set(frame.StreamId(num(f[1])), frame.ErrorCode(num(f[2])))
	case "wndinc":
		w := frame.NewWStreamWndInc()
		return w, w.Set(frame.StreamId(num(f[1])), num(f[2]))
	case "goaway":
		w := frame.NewWGoAway()
		return w, w.Set(frame.StreamId(num(f[1])), frame.ErrorCode(num(f[2])), blob(f[3]))
	}
	return nil, fmt.Errorf("unknown frame kind %q", f[0])
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		w, err := build(strings.Fields(in.Text()))
		if err != nil {
			fmt.Fprintf(out, "err %v\n", err)
			continue
		}
		buf := &buffer{}
		if err := frame.NewBasicTransport(buf).WriteFrame(w); err != nil {
			fmt.Fprintf(out, "err %v\n", err)
			continue
		}
		fmt.Fprintf(out, "ok %s\n", hex.EncodeToString(buf.Bytes()))
	}
}
