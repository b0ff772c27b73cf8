// The reference row of the benchmarks: the ambassador the article this project comes from describes, a
// single-host reverse proxy from Go's standard library whose transport tries a request up to three times
// when the connection fails (waiting 200, then 400 ms), and nothing else: no timeouts, breaker, limits,
// metrics or drain. One change any real deployment of it needs: the idle connection pool is raised from
// Go's default of 2 per host, which under 64 connections would dial anew for most requests.
//
// Built by the benchmarks with Go from Debian (`apt-get install golang-go`), offline: it needs only the
// standard library. UPSTREAM_URL and PORT as the ambassador's.
package main

import (
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"time"
)

func main() {
	upstream := os.Getenv("UPSTREAM_URL")
	if upstream == "" {
		upstream = "http://127.0.0.1:9000"
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	target, err := url.Parse(upstream)
	if err != nil {
		log.Fatal(err)
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConns = 1024
	transport.MaxIdleConnsPerHost = 1024
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = retrying{transport}
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, proxy))
}

// retrying sends a request again, up to three tries in all, when the connection to the upstream fails.
type retrying struct{ next http.RoundTripper }

func (r retrying) RoundTrip(req *http.Request) (*http.Response, error) {
	var err error
	for try := 1; try <= 3; try++ {
		var res *http.Response
		if res, err = r.next.RoundTrip(req); err == nil {
			return res, nil
		}
		log.Printf("try %d failed: %v", try, err)
		time.Sleep(time.Duration(try) * 200 * time.Millisecond)
	}
	return nil, err
}
