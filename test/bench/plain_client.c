/*
 * plain_client.c — the baseline of queue_bench.sh: sends the same requests
 * the drain sent, one after another over ONE reused libcurl easy handle (so
 * the connection is reused), with no database.  It is what a minimal client
 * of the same sinks would do.
 *
 *   plain_client http URL FILE
 *   plain_client smtp URL MAIL_FROM FILE
 *
 * FILE holds records "<a>\t<b>\t<len>\n" followed by <len> bytes and "\n":
 *   http: a = Idempotency-Key, b = X-Nocrm-Event, bytes = the JSON body
 *   smtp: a = recipient, b = unused, bytes = the RFC 5322 message
 *
 * Prints "ok=N failed=M wall=S cpu=C" (seconds, for the send loop only;
 * reading FILE into memory is not timed).  Exit status 1 if any failed.
 *
 * Build: gcc -O2 -o plain_client plain_client.c -lcurl
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct Req
{
	char	   *a;
	char	   *b;
	char	   *data;
	size_t		len;
} Req;

typedef struct Upload
{
	const char *data;
	size_t		len;
	size_t		sent;
} Upload;

static size_t
read_upload(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Upload	   *u = userdata;
	size_t		n = u->len - u->sent;

	if (n > size * nmemb)
		n = size * nmemb;
	memcpy(ptr, u->data + u->sent, n);
	u->sent += n;
	return n;
}

static size_t
discard(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	(void) ptr;
	(void) userdata;
	return size * nmemb;
}

static double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double
cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
		ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static Req *
load(const char *path, int *count)
{
	FILE	   *f = fopen(path, "rb");
	char	   *buf;
	long		size;
	Req		   *reqs = NULL;
	int			n = 0,
				cap = 0;
	char	   *p,
			   *end;

	if (!f || fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0)
	{
		perror(path);
		exit(2);
	}
	rewind(f);
	buf = malloc(size + 1);
	if (fread(buf, 1, size, f) != (size_t) size)
	{
		perror(path);
		exit(2);
	}
	fclose(f);
	buf[size] = '\0';
	p = buf;
	end = buf + size;
	while (p < end)
	{
		char	   *t1 = strchr(p, '\t');
		char	   *t2 = t1 ? strchr(t1 + 1, '\t') : NULL;
		char	   *nl = t2 ? strchr(t2 + 1, '\n') : NULL;
		Req		   *r;

		if (!nl)
		{
			fprintf(stderr, "%s: bad record at offset %ld\n", path, (long) (p - buf));
			exit(2);
		}
		if (n == cap)
		{
			cap = cap ? cap * 2 : 1024;
			reqs = realloc(reqs, sizeof(Req) * cap);
		}
		r = &reqs[n++];
		*t1 = *t2 = *nl = '\0';
		r->a = p;
		r->b = t1 + 1;
		r->len = strtoul(t2 + 1, NULL, 10);
		r->data = nl + 1;
		if (r->data + r->len > end)
		{
			fprintf(stderr, "%s: truncated record %d\n", path, n);
			exit(2);
		}
		p = r->data + r->len + 1;	/* skip the trailing "\n" */
		r->data[r->len] = '\0';
	}
	*count = n;
	return reqs;
}

int
main(int argc, char **argv)
{
	int			http;
	const char *url,
			   *from = NULL,
			   *file;
	Req		   *reqs;
	int			n,
				ok = 0,
				failed = 0;
	CURL	   *c;
	double		t0,
				c0;
	char		errbuf[CURL_ERROR_SIZE];
	char		from_br[512];

	if (argc == 4 && strcmp(argv[1], "http") == 0)
	{
		http = 1;
		url = argv[2];
		file = argv[3];
	}
	else if (argc == 5 && strcmp(argv[1], "smtp") == 0)
	{
		http = 0;
		url = argv[2];
		from = argv[3];
		file = argv[4];
	}
	else
	{
		fprintf(stderr, "usage: %s http URL FILE | smtp URL MAIL_FROM FILE\n", argv[0]);
		return 2;
	}
	reqs = load(file, &n);

	curl_global_init(CURL_GLOBAL_DEFAULT);
	c = curl_easy_init();
	/* What stays the same for every request is set once. */
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 20000L);
	if (http)
	{
		curl_easy_setopt(c, CURLOPT_POST, 1L);
		curl_easy_setopt(c, CURLOPT_USERAGENT, "plain_client/1.0");
		curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
	}
	else
	{
		snprintf(from_br, sizeof(from_br), "<%s>", from);
		curl_easy_setopt(c, CURLOPT_MAIL_FROM, from_br);
		curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
		curl_easy_setopt(c, CURLOPT_READFUNCTION, read_upload);
		curl_easy_setopt(c, CURLOPT_USE_SSL, (long) CURLUSESSL_NONE);
	}

	t0 = now_s();
	c0 = cpu_s();
	for (int i = 0; i < n; i++)
	{
		Req		   *r = &reqs[i];
		struct curl_slist *list = NULL;
		char		line[600];
		Upload		up = {r->data, r->len, 0};
		CURLcode	res;
		long		code = 0;

		errbuf[0] = '\0';
		if (http)
		{
			list = curl_slist_append(list, "Content-Type: application/json; charset=utf-8");
			snprintf(line, sizeof(line), "Idempotency-Key: %s", r->a);
			list = curl_slist_append(list, line);
			snprintf(line, sizeof(line), "X-Nocrm-Event: %s", r->b);
			list = curl_slist_append(list, line);
			list = curl_slist_append(list, "Expect:");
			curl_easy_setopt(c, CURLOPT_HTTPHEADER, list);
			curl_easy_setopt(c, CURLOPT_POSTFIELDS, r->data);
			curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long) r->len);
		}
		else
		{
			snprintf(line, sizeof(line), "<%s>", r->a);
			list = curl_slist_append(list, line);
			curl_easy_setopt(c, CURLOPT_MAIL_RCPT, list);
			curl_easy_setopt(c, CURLOPT_READDATA, &up);
			curl_easy_setopt(c, CURLOPT_INFILESIZE, (long) r->len);
		}
		res = curl_easy_perform(c);
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
		curl_slist_free_all(list);
		if (res == CURLE_OK && (!http || (code >= 200 && code < 300)))
			ok++;
		else
		{
			if (failed++ < 5)
				fprintf(stderr, "request %d failed: %s %s (code %ld)\n", i,
						curl_easy_strerror(res), errbuf, code);
		}
	}
	printf("ok=%d failed=%d wall=%.3f cpu=%.3f\n", ok, failed, now_s() - t0, cpu_s() - c0);
	curl_easy_cleanup(c);
	curl_global_cleanup();
	return failed ? 1 : 0;
}
