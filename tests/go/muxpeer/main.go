// Command muxpeer is the reference Go peer for Shroud's multiplexer tests and benchmark.
//
// It speaks muxado v1 through the library Debian ships (github.com/inconshreveable/muxado, built in
// GOPATH mode against /usr/share/gocode) and nothing else but the standard library. One process
// serves or dials sessions, answers the streams the peer opens (-accept) and, if asked, runs one
// scenario of its own (-run). Every result is one JSON object per line on stdout, so a test can
// read it without parsing prose; -trace logs every frame header, both directions, to stderr.
//
//	muxpeer -listen 127.0.0.1:0 [-tls -cert C -key K] [-sessions N] -accept echo|store|sink|close|none [-run ...]
//	muxpeer -dial 127.0.0.1:P [-tls] -accept ... -run none|open|idle|send
//
// Accept handlers (streams the peer opens):
//
//	echo   write back every byte as it arrives; half-close when the peer half-closes
//	store  read until the peer half-closes (at most -store-max bytes), then write it all back
//	       and half-close: every reply byte follows the peer's FIN
//	sink   read until EOF, count, reply the count as 8 bytes big-endian, half-close (benchmark)
//	close  read one byte, then Close() the stream; later DATA from the peer is answered by RST
//	none   accept and hold the stream untouched until the session ends
//
// Scenarios (-run):
//
//	open   open -streams streams at once, each sends -size pseudo-random bytes (math/rand seeded
//	       with the stream index), half-closes, reads the reply until EOF and compares it with
//	       what it sent (the peer must echo); one "stream" line each, then "open_done"
//	idle   keep the session idle for -idle seconds (heartbeats only), then run "open"
//	send   benchmark: open -streams streams, move -size bytes in total to a "sink" peer,
//	       check every count reply; one "send_done" line with MiB/s
//
// When the scenario finishes the process closes the session and exits (status 1 if any check
// failed). With -run none it serves until the peer ends the session (-sessions of them when
// listening), printing one "session_end" line each with the wire statistics.
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/inconshreveable/muxado"
)

// heartbeatStreamType is the stream type of the muxado heartbeat extension (0xFFFFFFFF - 0x100).
const heartbeatStreamType = 0xFFFFFEFF

var (
	listenAddr = flag.String("listen", "", "listen on this address (host:port; port 0 picks one, printed in the 'listening' line)")
	dialAddr   = flag.String("dial", "", "dial this address")
	useTLS     = flag.Bool("tls", false, "run the session over TLS")
	certFile   = flag.String("cert", "", "TLS certificate chain (PEM), for -listen")
	keyFile    = flag.String("key", "", "TLS private key (PEM), for -listen")
	sessions   = flag.Int("sessions", 1, "with -listen: serve this many sessions, then exit")
	acceptMode = flag.String("accept", "echo", "what to do with streams the peer opens: echo|store|sink|close|none")
	runMode    = flag.String("run", "none", "scenario to run on each session: none|open|idle|send")
	nStreams   = flag.Int("streams", 1, "streams for -run open|idle|send")
	size       = flag.Int64("size", 1<<20, "bytes per stream (open, idle) or in total (send)")
	idleSecs   = flag.Float64("idle", 35, "seconds of idleness for -run idle")
	storeMax   = flag.Int64("store-max", 64<<20, "bound on bytes buffered per stream by -accept store")
	trace      = flag.Bool("trace", false, "log every frame header to stderr")
	raw        = flag.Bool("raw", false, "no frame accounting on the transport (benchmark)")
	deadline   = flag.Duration("timeout", 120*time.Second, "give up on the whole run after this long (every run is bounded)")
)

// out serialises result lines: one JSON object per line, never interleaved.
var outMu sync.Mutex

func emit(event string, kv map[string]interface{}) {
	if kv == nil {
		kv = map[string]interface{}{}
	}
	kv["event"] = event
	b, _ := json.Marshal(kv)
	outMu.Lock()
	os.Stdout.Write(append(b, '\n'))
	outMu.Unlock()
}

func fatal(format string, args ...interface{}) {
	emit("fatal", map[string]interface{}{"error": fmt.Sprintf(format, args...)})
	os.Exit(2)
}

func main() {
	flag.Parse()
	if (*listenAddr == "") == (*dialAddr == "") {
		fatal("exactly one of -listen and -dial is required")
	}
	time.AfterFunc(*deadline, func() { fatal("run exceeded -timeout %v", *deadline) })

	ok := true
	if *listenAddr != "" {
		ok = listen()
	} else {
		ok = dial()
	}
	if !ok {
		os.Exit(1)
	}
}

func listen() bool {
	var l net.Listener
	var err error
	if *useTLS {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fatal("loading TLS key pair: %v", err)
		}
		l, err = tls.Listen("tcp", *listenAddr, &tls.Config{Certificates: []tls.Certificate{cert}})
		if err != nil {
			fatal("listen: %v", err)
		}
	} else if l, err = net.Listen("tcp", *listenAddr); err != nil {
		fatal("listen: %v", err)
	}
	defer l.Close()
	emit("listening", map[string]interface{}{"addr": l.Addr().String()})

	var wg sync.WaitGroup
	var failed int32
	for i := 0; i < *sessions; i++ {
		conn, err := l.Accept()
		if err != nil {
			fatal("accept: %v", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !serve(conn, false) {
				atomic.StoreInt32(&failed, 1)
			}
		}()
	}
	wg.Wait()
	return failed == 0
}

func dial() bool {
	var conn net.Conn
	var err error
	if *useTLS {
		// The tests make a throwaway CA per run; the peer's identity is not what is under test.
		conn, err = tls.Dial("tcp", *dialAddr, &tls.Config{InsecureSkipVerify: true})
	} else {
		conn, err = net.Dial("tcp", *dialAddr)
	}
	if err != nil {
		fatal("dial: %v", err)
	}
	return serve(conn, true)
}

// serve runs one session over conn: the accept handler, and the scenario if there is one.
func serve(conn net.Conn, client bool) bool {
	var w *wire
	if !*raw {
		w = newWire(conn)
		conn = w
	}
	var sess muxado.Session
	if client {
		sess = muxado.Client(conn)
	} else {
		sess = muxado.Server(conn)
	}
	emit("session_start", map[string]interface{}{"client": client, "remote": conn.RemoteAddr().String()})

	go acceptLoop(sess)

	ok := true
	ended := make(chan struct{})
	go func() {
		code, err, debug := sess.Wait()
		kv := map[string]interface{}{"code": int(code), "error": fmt.Sprint(err), "debug": string(debug)}
		if w != nil {
			w.addStats(kv)
		}
		emit("session_end", kv)
		close(ended)
	}()

	switch *runMode {
	case "none":
	case "open":
		ok = runOpen(sess)
	case "idle":
		// Fails here if the session died while idle (a heartbeat was not echoed in time).
		select {
		case <-ended:
			emit("idle_done", map[string]interface{}{"ok": false, "error": "session ended while idle"})
			return false
		case <-time.After(time.Duration(*idleSecs * float64(time.Second))):
		}
		emit("idle_done", map[string]interface{}{"ok": true, "seconds": *idleSecs})
		ok = runOpen(sess)
	case "send":
		ok = runSend(sess)
	default:
		fatal("unknown -run %q", *runMode)
	}
	if *runMode != "none" {
		sess.Close()
	}
	<-ended
	return ok
}

func acceptLoop(sess muxado.Session) {
	for {
		st, err := sess.Accept()
		if err != nil {
			return
		}
		go handle(st)
	}
}

// handle answers one stream the peer opened, according to -accept.
func handle(st muxado.Stream) {
	id := int(st.Id())
	h := sha256.New()
	var n int64
	var err error
	switch *acceptMode {
	case "echo":
		n, err = io.Copy(io.MultiWriter(st, h), st)
		if err == nil {
			_, err = st.HalfClose(nil)
		}
	case "store":
		var buf []byte
		buf, err = io.ReadAll(io.LimitReader(st, *storeMax+1))
		n = int64(len(buf))
		h.Write(buf)
		if err == nil && n > *storeMax {
			err = fmt.Errorf("more than -store-max %d bytes", *storeMax)
		}
		if err == nil {
			_, err = st.HalfClose(buf)
		}
	case "sink":
		n, err = io.Copy(io.Discard, st)
		if err == nil {
			var reply [8]byte
			binary.BigEndian.PutUint64(reply[:], uint64(n))
			_, err = st.HalfClose(reply[:])
		}
	case "close":
		var one [1]byte
		var k int
		k, err = io.ReadFull(st, one[:])
		n = int64(k)
		emit("closing", map[string]interface{}{"stream": id})
	case "none":
		return
	default:
		fatal("unknown -accept %q", *acceptMode)
	}
	kv := map[string]interface{}{"stream": id, "mode": *acceptMode, "bytes": n}
	if *acceptMode != "sink" {
		kv["sha256"] = hex.EncodeToString(h.Sum(nil))
	}
	if err != nil {
		kv["error"] = err.Error()
		emit("accepted_error", kv)
	} else {
		emit("accepted_done", kv)
	}
	st.Close()
}

// pattern is the deterministic payload of scenario stream index i.
func pattern(i int, n int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(int64(i) + 1)).Read(b)
	return b
}

func runOpen(sess muxado.Session) bool {
	start := time.Now()
	var wg sync.WaitGroup
	var good int32
	for i := 0; i < *nStreams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if openOne(sess, i) {
				atomic.AddInt32(&good, 1)
			}
		}(i)
	}
	wg.Wait()
	ok := int(good) == *nStreams
	emit("open_done", map[string]interface{}{
		"ok": ok, "streams": *nStreams, "good": good, "size": *size,
		"seconds": time.Since(start).Seconds(),
	})
	return ok
}

// openOne sends pattern(i) on a new stream, half-closes, and checks the reply is the same bytes.
func openOne(sess muxado.Session, i int) bool {
	kv := map[string]interface{}{"index": i, "size": *size}
	st, err := sess.Open()
	if err != nil {
		kv["error"] = "open: " + err.Error()
		emit("stream", kv)
		return false
	}
	defer st.Close()
	kv["stream"] = int(st.Id())
	data := pattern(i, *size)
	sum := sha256.Sum256(data)
	kv["sha256"] = hex.EncodeToString(sum[:])

	writeErr := make(chan error, 1)
	go func() {
		_, err := st.HalfClose(data)
		writeErr <- err
	}()
	got, rerr := io.ReadAll(io.LimitReader(st, *size+1))
	werr := <-writeErr
	gotSum := sha256.Sum256(got)
	kv["received"] = len(got)
	kv["received_sha256"] = hex.EncodeToString(gotSum[:])
	ok := rerr == nil && werr == nil && gotSum == sum
	kv["ok"] = ok
	if werr != nil {
		kv["write_error"] = werr.Error()
	}
	if rerr != nil {
		kv["read_error"] = rerr.Error()
	}
	emit("stream", kv)
	return ok
}

// runSend moves -size bytes in total over -streams streams to a sink and reports the throughput.
// Time runs from the first Open to the last count reply, so it covers delivery, not just buffering.
func runSend(sess muxado.Session) bool {
	chunk := pattern(0, 256<<10) // written repeatedly: generating 1 GiB would dominate the timing
	per := *size / int64(*nStreams)
	start := time.Now()
	var wg sync.WaitGroup
	var good int32
	for i := 0; i < *nStreams; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			st, err := sess.Open()
			if err != nil {
				emit("send_error", map[string]interface{}{"index": i, "error": err.Error()})
				return
			}
			defer st.Close()
			for left := per; left > 0; {
				n := int64(len(chunk))
				if n > left {
					n = left
				}
				if _, err := st.Write(chunk[:n]); err != nil {
					emit("send_error", map[string]interface{}{"index": i, "error": err.Error()})
					return
				}
				left -= n
			}
			if _, err := st.HalfClose(nil); err != nil {
				emit("send_error", map[string]interface{}{"index": i, "error": err.Error()})
				return
			}
			reply, err := io.ReadAll(io.LimitReader(st, 9))
			if err != nil || len(reply) != 8 || int64(binary.BigEndian.Uint64(reply)) != per {
				emit("send_error", map[string]interface{}{"index": i, "error": fmt.Sprintf("bad count reply %x (%v)", reply, err)})
				return
			}
			atomic.AddInt32(&good, 1)
		}(i)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	total := per * int64(*nStreams)
	ok := int(good) == *nStreams
	emit("send_done", map[string]interface{}{
		"ok": ok, "streams": *nStreams, "bytes": total, "seconds": secs,
		"mib_per_s": float64(total) / (1 << 20) / secs,
	})
	return ok
}

// wire wraps the transport and parses the frame headers going each way, for -trace and for the
// statistics in "session_end" (frames per type, RST codes, the peer's heartbeat traffic).
type wire struct {
	net.Conn
	in, out frameScanner
}

func newWire(c net.Conn) *wire {
	w := &wire{Conn: c}
	w.in.dir, w.out.dir = "<-", "->"
	return w
}

func (w *wire) Read(b []byte) (int, error) {
	n, err := w.Conn.Read(b)
	w.in.feed(b[:n])
	return n, err
}

func (w *wire) Write(b []byte) (int, error) {
	n, err := w.Conn.Write(b)
	w.out.feed(b[:n])
	return n, err
}

func (w *wire) addStats(kv map[string]interface{}) {
	w.in.mu.Lock()
	defer w.in.mu.Unlock()
	w.out.mu.Lock()
	defer w.out.mu.Unlock()
	kv["frames_in"] = w.in.frames
	kv["frames_out"] = w.out.frames
	kv["rst_in"] = w.in.rsts
	kv["rst_out"] = w.out.rsts
	kv["rst_in_codes"] = w.in.rstCodes
	kv["rst_out_codes"] = w.out.rstCodes
	kv["peer_heartbeat_stream"] = w.in.hbStream
	kv["peer_heartbeat_bytes"] = w.in.hbBytes
	kv["own_heartbeat_stream"] = w.out.hbStream
	kv["heartbeat_echo_bytes"] = w.in.echoBytes(w.out.hbStream)
	kv["data_bytes_in"] = w.in.dataBytes
	kv["data_bytes_out"] = w.out.dataBytes
}

// maxRsts bounds the RSTs listed one by one in "session_end"; Go answers every late FIN of a
// finished stream with an RST, so a busy session would otherwise print thousands.
const maxRsts = 32

var frameNames = map[byte]string{1: "SYN", 2: "RST", 3: "DATA", 4: "WNDINC", 5: "PRI", 6: "GOAWAY"}

// frameScanner follows one direction of the byte stream frame by frame (headers and the small
// fixed payloads it needs; DATA payloads are only counted).
type frameScanner struct {
	mu        sync.Mutex
	dir       string
	hdr       []byte // header being assembled, then the small payload being kept
	typ, flag byte
	sid       uint32
	length    int
	left      int    // payload bytes still to pass before the next header
	keep      []byte // payload kept for SYN/RST/WNDINC/GOAWAY (at most 8 bytes used)
	inHeader  bool
	frames    map[string]int
	rsts      []map[string]uint32 // the first maxRsts RSTs, for assertions about specific streams
	rstCodes  map[string]int      // all RSTs, counted by error code
	dataBytes int64
	hbStream  uint32
	hbBytes   int64
	perStream map[uint32]int64 // DATA payload bytes per stream, for the heartbeat echo count
}

func (s *frameScanner) echoBytes(sid uint32) int64 { return s.perStream[sid] }

func (s *frameScanner) feed(b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.frames == nil {
		s.frames = map[string]int{}
		s.perStream = map[uint32]int64{}
		s.rstCodes = map[string]int{}
		s.inHeader = true
	}
	for len(b) > 0 {
		if s.inHeader {
			need := 8 - len(s.hdr)
			if need > len(b) {
				need = len(b)
			}
			s.hdr = append(s.hdr, b[:need]...)
			b = b[need:]
			if len(s.hdr) < 8 {
				return
			}
			s.length = int(binary.BigEndian.Uint16(s.hdr[0:2]) & 0x3FFF)
			s.flag = s.hdr[2]
			s.typ = s.hdr[3] & 0x1F
			s.sid = binary.BigEndian.Uint32(s.hdr[4:8]) & 0x7FFFFFFF
			s.hdr = s.hdr[:0]
			s.keep = s.keep[:0]
			s.left = s.length
			s.inHeader = false
			if s.typ == 3 {
				s.dataBytes += int64(s.length)
				s.perStream[s.sid] += int64(s.length)
				if s.sid == s.hbStream && s.hbStream != 0 {
					s.hbBytes += int64(s.length)
				}
			}
		}
		n := s.left
		if n > len(b) {
			n = len(b)
		}
		if s.typ != 3 && len(s.keep) < 8 {
			k := n
			if k > 8-len(s.keep) {
				k = 8 - len(s.keep)
			}
			s.keep = append(s.keep, b[:k]...)
		}
		s.left -= n
		b = b[n:]
		// A Go GOAWAY announces more payload than it writes (docs/PROTOCOL.md, "Frame"): count it once the fixed
		// 8 bytes are in, and resynchronise on whatever follows.
		if s.left == 0 || (s.typ == 6 && len(s.keep) == 8) {
			s.finish()
			s.inHeader = true
		}
	}
}

func (s *frameScanner) finish() {
	name, known := frameNames[s.typ]
	if !known {
		name = fmt.Sprintf("TYPE%d", s.typ)
	}
	s.frames[name]++
	detail := ""
	u32 := func(off int) uint32 {
		if len(s.keep) >= off+4 {
			return binary.BigEndian.Uint32(s.keep[off : off+4])
		}
		return 0
	}
	switch s.typ {
	case 1:
		off := 0
		if s.flag&0x02 != 0 {
			detail += fmt.Sprintf(" priority=%d", u32(0))
			off = 4
		}
		if s.flag&0x04 != 0 {
			t := u32(off)
			detail += fmt.Sprintf(" streamtype=0x%x", t)
			if t == heartbeatStreamType {
				s.hbStream = s.sid
			}
		}
	case 2:
		if len(s.rsts) < maxRsts {
			s.rsts = append(s.rsts, map[string]uint32{"stream": s.sid, "code": u32(0)})
		}
		s.rstCodes[fmt.Sprint(u32(0))]++
		detail = fmt.Sprintf(" code=%d", u32(0))
	case 4:
		detail = fmt.Sprintf(" inc=%d", u32(0))
	case 6:
		detail = fmt.Sprintf(" last=%d code=%d", u32(0)&0x7FFFFFFF, u32(4))
	}
	if *trace {
		fin := ""
		if s.typ == 3 && s.flag&0x01 != 0 {
			fin = " fin"
		}
		fmt.Fprintf(os.Stderr, "%s %s %s sid=%d len=%d flags=0x%02x%s%s\n",
			time.Now().Format("15:04:05.000"), s.dir, name, s.sid, s.length, s.flag, detail, fin)
	}
}
