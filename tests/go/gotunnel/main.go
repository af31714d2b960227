// Command gotunnel plays the original shroud (2014) in Shroud's compatibility tests: the Go
// client that binds a TLS name on a proxy, or the Go public proxy (shroud-server) that routes
// public TLS connections by SNI to bound clients.
//
// The original stood on go-tunnel, which Debian does not package, so this program declares the
// go-tunnel message structs itself, exactly as go-tunnel declares them (field names, order and
// types), and frames them as go-tunnel does: an 8-byte little-endian int64 length written with
// one Write, then the JSON envelope {"Type":..,"Payload":..} from encoding/json written with a
// second Write. Decoding is go-tunnel's too: the envelope's Payload is kept raw, the Type looked
// up in the registered types (Auth, AuthResp, Bind, BindResp, StartProxy), and the payload
// decoded with json.Unmarshal (case-insensitive keys, unknown keys ignored). The session is
// muxado v1 (Debian's github.com/inconshreveable/muxado, built in GOPATH mode) over TLS; the
// tunnel client is muxado.Client, the proxy muxado.Server, both with muxado's heartbeat.
//
//	gotunnel -mode client -proxy HOST:PORT -name NAME -target HOST:PORT [-pin SHA256HEX]
//	gotunnel -mode server -tunnel-addr 127.0.0.1:0 -public-addr 127.0.0.1:0 -cert C -key K
//
// client: dial the proxy over TLS (no CA check, as a test; with -pin the leaf certificate's
// SHA-256 must match), open the auth stream (Auth{Version ["1"], ClientId "", Extra null}), read
// AuthResp, close it; open a bind stream (Bind{Protocol "tls", Options {Hostname NAME,
// Subdomain ""}, Extra null}), read BindResp, close it; then for every stream the proxy opens,
// read StartProxy, dial -target and splice both ways, closing both at the first EOF. A BindResp
// with an Error is permanent, as in go-tunnel: the program prints it and exits with status 3.
//
// server: listen TLS for tunnels (one muxado.Server session per connection); the first stream
// is the auth stream (the Version list must hold "1"; answer AuthResp with a fresh 32-hex
// ClientId, Extra null); every later stream carries one Bind, answered BindResp{Url
// "tls://NAME"} or an Error (unsupported protocol, empty or already bound name). The public TCP
// listener peeks the ClientHello's server_name (go-vhost style, kept small: one handshake
// record, 10 s deadline), looks the lower-cased name up, opens a muxado stream on the tunnel
// that bound it, writes StartProxy{Url, ClientAddr}, replays the peeked bytes and splices,
// closing both at the first EOF (go-tunnel's conn.Join). Unknown names are closed.
//
// Output: one JSON object per line on stdout ("event" names what happened), the same
// convention as tests/go/muxpeer, so tests/fixtures/gopeer.py can read it. Every control
// message received is also re-encoded with encoding/json and compared with the bytes on the
// wire ("reencode_equal"): true means the peer wrote exactly what Go writes.
package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/inconshreveable/muxado"
)

// ---- go-tunnel's messages, declared as go-tunnel declares them ----------------------------

type Envelope struct {
	Type    string
	Payload json.RawMessage
}

type Auth struct {
	Version  []string
	ClientId string
	Extra    interface{}
}

type AuthResp struct {
	Version  string
	ClientId string
	Error    string
	Extra    interface{}
}

type Bind struct {
	Protocol string
	Options  interface{}
	Extra    interface{}
}

// TLSOptions are the Options of a "tls" Bind (what the original shroud client sends).
type TLSOptions struct {
	Hostname  string
	Subdomain string
}

type TCPOptions struct {
	RemotePort uint16
}

type BindResp struct {
	Url      string
	Protocol string
	Error    string
	Extra    interface{}
}

type StartProxy struct {
	Url        string
	ClientAddr string
}

var typeMap = map[string]reflect.Type{
	"Auth":       reflect.TypeOf(Auth{}),
	"AuthResp":   reflect.TypeOf(AuthResp{}),
	"Bind":       reflect.TypeOf(Bind{}),
	"BindResp":   reflect.TypeOf(BindResp{}),
	"StartProxy": reflect.TypeOf(StartProxy{}),
}

// pack is go-tunnel's proto.Pack: the envelope's Type is the payload's type name.
func pack(payload interface{}) ([]byte, error) {
	return json.Marshal(struct {
		Type    string
		Payload interface{}
	}{reflect.TypeOf(payload).Elem().Name(), payload})
}

// writeMsg is go-tunnel's proto.WriteMsg: the length and the JSON in two writes.
func writeMsg(w io.Writer, msg interface{}) error {
	buf, err := pack(msg)
	if err != nil {
		return err
	}
	if err := binary.Write(w, binary.LittleEndian, int64(len(buf))); err != nil {
		return err
	}
	_, err = w.Write(buf)
	traceMsg("send", buf)
	return err
}

// traceMsg logs one control message to stderr with -trace.
func traceMsg(dir string, buf []byte) {
	if *trace {
		fmt.Fprintf(os.Stderr, "%s %s len=%d %s\n", time.Now().Format("15:04:05.000"), dir, len(buf), buf)
	}
}

// maxMsg bounds what this test program allocates for one message (go-tunnel has no bound; a
// real message is under 1 KiB, so 1 MiB only guards the test against a wild length).
const maxMsg = 1 << 20

// readMsg is go-tunnel's proto.ReadMsg: it returns the decoded message (a pointer to one of the
// registered structs) and the JSON bytes as they arrived.
func readMsg(r io.Reader) (interface{}, []byte, error) {
	var size int64
	if err := binary.Read(r, binary.LittleEndian, &size); err != nil {
		return nil, nil, err
	}
	if size < 0 || size > maxMsg {
		return nil, nil, fmt.Errorf("message length %d out of bounds", size)
	}
	buf := make([]byte, size)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, nil, err
	}
	traceMsg("recv", buf)
	var env Envelope
	if err := json.Unmarshal(buf, &env); err != nil {
		return nil, buf, err
	}
	t, ok := typeMap[env.Type]
	if !ok {
		return nil, buf, fmt.Errorf("Unsupposted message type %s", env.Type)
	}
	msg := reflect.New(t).Interface()
	if err := json.Unmarshal(env.Payload, &msg); err != nil {
		return nil, buf, err
	}
	return msg, buf, nil
}

// reencodeEqual reports whether Go's encoder writes msg as exactly the wire bytes.
func reencodeEqual(msg interface{}, wire []byte) bool {
	again, err := pack(msg)
	return err == nil && bytes.Equal(again, wire)
}

// ---- output ---------------------------------------------------------------------------------

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

var (
	mode       = flag.String("mode", "", "client | server")
	proxyAddr  = flag.String("proxy", "", "client: the proxy's tunnel address")
	name       = flag.String("name", "", "client: the TLS name to bind")
	target     = flag.String("target", "", "client: the local service every proxied stream goes to")
	pin        = flag.String("pin", "", "client: SHA-256 (hex) the proxy's certificate must have")
	tunnelAddr = flag.String("tunnel-addr", "127.0.0.1:0", "server: TLS listener for tunnels")
	publicAddr = flag.String("public-addr", "127.0.0.1:0", "server: public TLS listener (SNI)")
	certFile   = flag.String("cert", "", "server: tunnel certificate (PEM)")
	keyFile    = flag.String("key", "", "server: tunnel key (PEM)")
	trace      = flag.Bool("trace", false, "log every control message, both directions, to stderr")
	deadline   = flag.Duration("timeout", 300*time.Second, "exit after this long (every run is bounded)")
)

// muxTimeout is go-vhost's peek deadline in the original shroud-server (10 s).
const muxTimeout = 10 * time.Second

func main() {
	flag.Parse()
	time.AfterFunc(*deadline, func() { fatal("run exceeded -timeout %v", *deadline) })
	switch *mode {
	case "client":
		runClient()
	case "server":
		runServer()
	default:
		fatal("-mode must be client or server")
	}
}

// join copies both ways and closes both at the first EOF (go-tunnel's conn.Join).
func join(a, b net.Conn) (int64, int64) {
	var wg sync.WaitGroup
	var ab, ba int64
	pipe := func(to, from net.Conn, n *int64) {
		defer wg.Done()
		defer from.Close()
		defer to.Close()
		*n, _ = io.Copy(to, from)
	}
	wg.Add(2)
	go pipe(b, a, &ab)
	go pipe(a, b, &ba)
	wg.Wait()
	return ab, ba
}

// ---- client mode: the original shroud client ---------------------------------------------

func runClient() {
	if *proxyAddr == "" || *name == "" || *target == "" {
		fatal("client mode needs -proxy, -name and -target")
	}
	cfg := &tls.Config{InsecureSkipVerify: true}
	if *pin != "" {
		want := strings.ToLower(strings.ReplaceAll(*pin, ":", ""))
		cfg.VerifyPeerCertificate = func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("no certificate")
			}
			sum := sha256.Sum256(raw[0])
			if got := hex.EncodeToString(sum[:]); got != want {
				return fmt.Errorf("certificate fingerprint %s is not the pinned %s", got, want)
			}
			return nil
		}
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", *proxyAddr, cfg)
	if err != nil {
		fatal("dial %s: %v", *proxyAddr, err)
	}
	sess := muxado.Client(conn)
	defer sess.Close()

	var authResp AuthResp
	wire, err := request(sess, &Auth{Version: []string{"1"}, ClientId: "", Extra: nil}, &authResp)
	if err != nil {
		fatal("auth: %v", err)
	}
	emit("auth", map[string]interface{}{"client_id": authResp.ClientId, "version": authResp.Version,
		"error": authResp.Error, "extra": authResp.Extra, "wire": string(wire),
		"reencode_equal": reencodeEqual(&authResp, wire)})
	if authResp.Error != "" {
		emit("auth_refused", map[string]interface{}{"error": authResp.Error})
		os.Exit(3)
	}

	var bindResp BindResp
	bind := &Bind{Protocol: "tls", Options: &TLSOptions{Hostname: *name, Subdomain: ""}, Extra: nil}
	wire, err = request(sess, bind, &bindResp)
	if err != nil {
		fatal("bind: %v", err)
	}
	emit("bind", map[string]interface{}{"url": bindResp.Url, "protocol": bindResp.Protocol,
		"error": bindResp.Error, "extra": bindResp.Extra, "wire": string(wire),
		"reencode_equal": reencodeEqual(&bindResp, wire)})
	if bindResp.Error != "" {
		// Printed for people, as the original client logged it; the test reads this line.
		fmt.Fprintf(os.Stderr, "Failed to bind %s: %s\n", *name, bindResp.Error)
		emit("bind_refused", map[string]interface{}{"error": bindResp.Error})
		os.Exit(3)
	}
	url := bindResp.Url

	for {
		stream, err := sess.Accept()
		if err != nil {
			emit("session_end", map[string]interface{}{"error": err.Error()})
			return
		}
		go clientProxy(stream, url)
	}
}

// request is go-tunnel's RawSession.req: a new stream, one message each way, then Close.
func request(sess muxado.Session, req interface{}, resp interface{}) ([]byte, error) {
	stream, err := sess.Open()
	if err != nil {
		return nil, err
	}
	defer stream.Close()
	stream.SetDeadline(time.Now().Add(30 * time.Second))
	if err := writeMsg(stream, req); err != nil {
		return nil, err
	}
	msg, wire, err := readMsg(stream)
	if err != nil {
		return wire, err
	}
	if reflect.TypeOf(msg) != reflect.TypeOf(resp) {
		return wire, fmt.Errorf("expected %T, got %T", resp, msg)
	}
	reflect.ValueOf(resp).Elem().Set(reflect.ValueOf(msg).Elem())
	return wire, nil
}

func clientProxy(stream muxado.Stream, url string) {
	defer stream.Close()
	stream.SetReadDeadline(time.Now().Add(30 * time.Second))
	msg, wire, err := readMsg(stream)
	if err != nil {
		emit("proxy_error", map[string]interface{}{"error": fmt.Sprintf("Server failed to write StartProxy: %v", err), "wire": string(wire)})
		return
	}
	stream.SetReadDeadline(time.Time{})
	start, ok := msg.(*StartProxy)
	if !ok {
		emit("proxy_error", map[string]interface{}{"error": fmt.Sprintf("expected StartProxy, got %T", msg), "wire": string(wire)})
		return
	}
	emit("proxy", map[string]interface{}{"url": start.Url, "client_addr": start.ClientAddr,
		"wire": string(wire), "reencode_equal": reencodeEqual(start, wire)})
	if start.Url != url {
		emit("proxy_error", map[string]interface{}{"error": "Couldn't find tunnel for proxy: " + start.Url})
		return
	}
	local, err := net.DialTimeout("tcp", *target, 10*time.Second)
	if err != nil {
		emit("proxy_error", map[string]interface{}{"error": err.Error()})
		return
	}
	in, out := join(stream, local)
	emit("proxy_done", map[string]interface{}{"url": start.Url, "bytes_in": in, "bytes_out": out})
}

// ---- server mode: the original shroud-server's tunnel side -------------------------------

type server struct {
	mu      sync.Mutex
	tunnels map[string]muxado.Session // bound name -> session
}

func runServer() {
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fatal("loading TLS key pair: %v", err)
	}
	tl, err := tls.Listen("tcp", *tunnelAddr, &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		fatal("tunnel listen: %v", err)
	}
	pl, err := net.Listen("tcp", *publicAddr)
	if err != nil {
		fatal("public listen: %v", err)
	}
	emit("listening", map[string]interface{}{"addr": tl.Addr().String(), "public": pl.Addr().String()})
	s := &server{tunnels: map[string]muxado.Session{}}
	go func() {
		for {
			c, err := pl.Accept()
			if err != nil {
				fatal("public accept: %v", err)
			}
			go s.public(c)
		}
	}()
	for {
		c, err := tl.Accept()
		if err != nil {
			fatal("tunnel accept: %v", err)
		}
		go s.session(muxado.Server(c))
	}
}

func (s *server) session(sess muxado.Session) {
	var names []string
	defer func() {
		s.mu.Lock()
		for _, n := range names {
			if s.tunnels[n] == sess {
				delete(s.tunnels, n)
			}
		}
		s.mu.Unlock()
		sess.Close()
		emit("session_end", map[string]interface{}{"names": names})
	}()

	// The auth stream.
	stream, err := sess.Accept()
	if err != nil {
		emit("session_error", map[string]interface{}{"error": "Failed to accept auth stream: " + err.Error()})
		return
	}
	stream.SetDeadline(time.Now().Add(30 * time.Second))
	msg, wire, err := readMsg(stream)
	auth, ok := msg.(*Auth)
	if err != nil || !ok {
		emit("session_error", map[string]interface{}{"error": fmt.Sprintf("Failed to read auth message; %v %T", err, msg), "wire": string(wire)})
		stream.Close()
		return
	}
	id := make([]byte, 16)
	rand.Read(id)
	resp := &AuthResp{Version: "1", ClientId: hex.EncodeToString(id)}
	hasOne := false
	for _, v := range auth.Version {
		hasOne = hasOne || v == "1"
	}
	if !hasOne {
		resp = &AuthResp{Error: fmt.Sprintf("No acceptable protocol version. Requested: %v, capable: 1", auth.Version)}
	}
	emit("auth", map[string]interface{}{"version": auth.Version, "client_id": auth.ClientId,
		"extra": auth.Extra, "wire": string(wire), "reencode_equal": reencodeEqual(auth, wire),
		"assigned": resp.ClientId})
	err = writeMsg(stream, resp)
	stream.Close()
	if err != nil || resp.Error != "" {
		return
	}

	// Bind streams, until the session ends.
	for {
		stream, err := sess.Accept()
		if err != nil {
			return
		}
		stream.SetDeadline(time.Now().Add(30 * time.Second))
		msg, wire, err := readMsg(stream)
		bind, ok := msg.(*Bind)
		if err != nil || !ok {
			// go-tunnel fails the whole session on a bad stream.
			emit("session_error", map[string]interface{}{"error": fmt.Sprintf("Failed to read message: %v %T", err, msg), "wire": string(wire)})
			stream.Close()
			return
		}
		var opts TLSOptions
		optsErr := unpackField(bind.Options, &opts)
		host := strings.ToLower(opts.Hostname)
		resp := &BindResp{}
		s.mu.Lock()
		switch {
		case bind.Protocol != "tls":
			resp.Error = fmt.Sprintf("Can't bind for %s connections", bind.Protocol)
		case optsErr != nil:
			resp.Error = optsErr.Error()
		case host == "":
			resp.Error = "a hostname is required"
		case s.tunnels[host] != nil:
			resp.Error = fmt.Sprintf("name %s is already bound", host)
		default:
			s.tunnels[host] = sess
			names = append(names, host)
			resp.Url = "tls://" + host
		}
		s.mu.Unlock()
		emit("bind", map[string]interface{}{"protocol": bind.Protocol, "hostname": opts.Hostname,
			"subdomain": opts.Subdomain, "extra": bind.Extra, "url": resp.Url, "error": resp.Error,
			"wire": string(wire), "reencode_equal": reencodeEqual(bind, wire)})
		writeMsg(stream, resp)
		stream.Close()
	}
}

// unpackField turns a decoded interface{} (a map) into a struct, as go-tunnel's
// proto.UnpackInterfaceField does: through JSON.
func unpackField(raw interface{}, out interface{}) error {
	b, err := json.Marshal(raw)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

func (s *server) public(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(muxTimeout))
	peeked, sni, err := peekSNI(c)
	c.SetDeadline(time.Time{})
	if err != nil {
		emit("public_refused", map[string]interface{}{"error": err.Error()})
		return
	}
	host := strings.ToLower(sni)
	s.mu.Lock()
	sess := s.tunnels[host]
	s.mu.Unlock()
	if sess == nil {
		emit("public_refused", map[string]interface{}{"error": "no tunnel for " + sni})
		return
	}
	url := "tls://" + host
	stream, err := sess.Open()
	if err != nil {
		emit("public_refused", map[string]interface{}{"error": "Failed to open proxy connection: " + err.Error()})
		return
	}
	defer stream.Close()
	if err := writeMsg(stream, &StartProxy{Url: url, ClientAddr: c.RemoteAddr().String()}); err != nil {
		return
	}
	emit("proxy", map[string]interface{}{"sni": sni, "url": url, "client_addr": c.RemoteAddr().String()})
	if _, err := stream.Write(peeked); err != nil {
		return
	}
	in, out := join(c, stream)
	emit("proxy_done", map[string]interface{}{"url": url, "bytes_in": in + int64(len(peeked)), "bytes_out": out})
}

// maxRecord bounds the one handshake record read for the ClientHello (go-vhost's TLS record
// limit, 16384 + 2048).
const maxRecord = 16384 + 2048

// peekSNI reads one TLS record holding a whole ClientHello and returns the bytes read and the
// server_name. Kept small for a test: a ClientHello spread over several records is refused.
func peekSNI(r io.Reader) ([]byte, string, error) {
	head := make([]byte, 5)
	if _, err := io.ReadFull(r, head); err != nil {
		return head, "", err
	}
	n := int(binary.BigEndian.Uint16(head[3:5]))
	if head[0] != 22 || n > maxRecord {
		return head, "", fmt.Errorf("not a TLS handshake record: % x", head)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return append(head, body...), "", err
	}
	all := append(head, body...)
	sni, err := parseClientHello(body)
	return all, sni, err
}

func parseClientHello(b []byte) (string, error) {
	short := errors.New("truncated ClientHello")
	if len(b) < 4 || b[0] != 1 {
		return "", errors.New("not a ClientHello")
	}
	n := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
	if len(b) < 4+n {
		return "", errors.New("ClientHello spans several records (not supported here)")
	}
	b = b[4 : 4+n]
	// version (2), random (32), session id
	if len(b) < 35 {
		return "", short
	}
	b = b[34:]
	skip := func(lenBytes int) bool {
		if len(b) < lenBytes {
			return false
		}
		l := 0
		for i := 0; i < lenBytes; i++ {
			l = l<<8 | int(b[i])
		}
		if len(b) < lenBytes+l {
			return false
		}
		b = b[lenBytes+l:]
		return true
	}
	if !skip(1) || !skip(2) || !skip(1) { // session id, cipher suites, compression methods
		return "", short
	}
	if len(b) < 2 {
		return "", nil // no extensions: no name
	}
	ext := b[2:]
	if int(binary.BigEndian.Uint16(b)) != len(ext) {
		return "", errors.New("bad extensions length")
	}
	for len(ext) >= 4 {
		typ := binary.BigEndian.Uint16(ext)
		l := int(binary.BigEndian.Uint16(ext[2:]))
		if len(ext) < 4+l {
			return "", short
		}
		data := ext[4 : 4+l]
		ext = ext[4+l:]
		if typ != 0 || len(data) < 2 {
			continue
		}
		list := data[2:]
		for len(list) >= 3 {
			kind := list[0]
			nl := int(binary.BigEndian.Uint16(list[1:]))
			if len(list) < 3+nl {
				return "", short
			}
			if kind == 0 {
				return string(list[3 : 3+nl]), nil
			}
			list = list[3+nl:]
		}
	}
	return "", nil
}
