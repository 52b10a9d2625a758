/*
 * delivery.c — sending one email (SMTP) or one JSON POST (HTTP) with
 * libcurl, and building RFC 5322 messages.
 *
 * Nothing here touches the database: the drain calls it with no snapshot
 * held and records the outcome afterwards.  One curl handle per protocol is
 * kept for a batch so connections are reused.
 */
#include "nocrm.h"

#include <curl/curl.h>
#include <time.h>

#include "common/base64.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"

static bool curl_ready = false;

typedef struct UploadBuffer
{
	const char *data;
	size_t		len;
	size_t		sent;
} UploadBuffer;

static size_t
read_upload(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	UploadBuffer *buf = (UploadBuffer *) userdata;
	size_t		room = size * nmemb;
	size_t		left = buf->len - buf->sent;
	size_t		n = left < room ? left : room;

	memcpy(ptr, buf->data + buf->sent, n);
	buf->sent += n;
	return n;
}

static size_t
discard_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	StringInfo	sink = (StringInfo) userdata;

	/* Keep the start of the answer for error messages. */
	if (sink->len < 200)
		appendBinaryStringInfo(sink, ptr, Min(size * nmemb, (size_t) (200 - sink->len)));
	return size * nmemb;
}

/*
 * Lets a cancel or shutdown stop a slow transfer.  Not InterruptPending:
 * routine timers (statistics flushes) set it too.
 */
static int
check_interrupts(void *clientp, curl_off_t dltotal, curl_off_t dlnow,
				 curl_off_t ultotal, curl_off_t ulnow)
{
	return (QueryCancelPending || ProcDiePending) ? 1 : 0;
}

static void
ensure_curl(void)
{
	if (!curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
			elog(ERROR, "curl_global_init failed");
		curl_ready = true;
	}
}

void
nocrm_delivery_begin(DeliveryHandles *h)
{
	ensure_curl();
	h->smtp = h->http = NULL;
}

void
nocrm_delivery_end(DeliveryHandles *h)
{
	if (h->smtp)
		curl_easy_cleanup((CURL *) h->smtp);
	if (h->http)
		curl_easy_cleanup((CURL *) h->http);
	h->smtp = h->http = NULL;
}

static CURL *
handle(void **slot)
{
	CURL	   *c = (CURL *) *slot;

	if (c == NULL)
	{
		c = curl_easy_init();
		if (c == NULL)
			elog(ERROR, "curl_easy_init failed");
		*slot = c;
	}
	else
		curl_easy_reset(c);		/* keeps the connection cache */
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, check_interrupts);
	return c;
}

/* A single, plain address: no display name, brackets, spaces or line breaks. */
bool
nocrm_valid_address(const char *addr)
{
	const char *at;

	if (addr == NULL || addr[0] == '\0' || strlen(addr) > 320)
		return false;
	for (const char *p = addr; *p; p++)
		if ((unsigned char) *p <= ' ' || strchr("<>,;\"()[]\\", *p))
			return false;
	at = strchr(addr, '@');
	return at != NULL && at != addr && at[1] != '\0' && strchr(at + 1, '@') == NULL;
}

static bool
is_ascii_printable(const char *s)
{
	for (; *s; s++)
		if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e)
			return false;
	return true;
}

static char *
base64(const char *data, int len)
{
	int			enclen = pg_b64_enc_len(len);
	char	   *out = palloc(enclen + 1);
	int			n = pg_b64_encode(data, len, out, enclen);

	if (n < 0)
		elog(ERROR, "base64 encoding failed");
	out[n] = '\0';
	return out;
}

/*
 * A header value as RFC 2047 encoded words when it is not plain ASCII.  Line
 * breaks never survive: lead data cannot add headers.
 */
static void
append_header(StringInfo msg, const char *name, const char *value)
{
	char	   *clean = pstrdup(value ? value : "");

	for (char *p = clean; *p; p++)
		if (*p == '\r' || *p == '\n' || *p == '\t')
			*p = ' ';
	if (is_ascii_printable(clean) && strlen(clean) < 900)
	{
		appendStringInfo(msg, "%s: %s\r\n", name, clean);
		return;
	}
	/* Encoded words of at most 45 bytes of text, on folded lines, never splitting a character. */
	appendStringInfo(msg, "%s:", name);
	for (int i = 0, len = strlen(clean); i < len;)
	{
		int			chunk = Min(45, len - i);

		while (chunk < len - i && chunk > 1 &&
			   (((unsigned char) clean[i + chunk]) & 0xC0) == 0x80)
			chunk--;
		appendStringInfo(msg, " =?UTF-8?B?%s?=\r\n", base64(clean + i, chunk));
		i += chunk;
	}
	if (clean[0] == '\0')
		appendStringInfoString(msg, " \r\n");
}

/* RFC 5322 message: headers, then the UTF-8 body in base64. */
char *
nocrm_build_message(const char *from, const char *to, const char *subject,
					const char *body, const char *idempotency_key)
{
	StringInfoData msg;
	char		date[64];
	time_t		now = time(NULL);
	struct tm	tm;
	const char *domain = strchr(from, '@');
	char	   *encoded;
	int			len;

	gmtime_r(&now, &tm);
	/* English names regardless of the server's locale */
	snprintf(date, sizeof(date), "%s, %02d %s %04d %02d:%02d:%02d +0000",
			 ((const char *[]) {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"})[tm.tm_wday],
			 tm.tm_mday,
			 ((const char *[]) {"Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
			  "Sep", "Oct", "Nov", "Dec"})[tm.tm_mon],
			 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);

	initStringInfo(&msg);
	append_header(&msg, "Date", date);
	append_header(&msg, "From", from);
	append_header(&msg, "To", to);
	append_header(&msg, "Subject", subject);
	appendStringInfo(&msg, "Message-ID: <%s@%s>\r\n", idempotency_key,
					 domain ? domain + 1 : "nocrm.invalid");
	append_header(&msg, "X-Nocrm-Idempotency-Key", idempotency_key);
	appendStringInfoString(&msg, "MIME-Version: 1.0\r\n"
						   "Content-Type: text/plain; charset=UTF-8\r\n"
						   "Content-Transfer-Encoding: base64\r\n\r\n");
	encoded = base64(body, strlen(body));
	len = strlen(encoded);
	for (int i = 0; i < len; i += 76)
	{
		appendBinaryStringInfo(&msg, encoded + i, Min(76, len - i));
		appendStringInfoString(&msg, "\r\n");
	}
	return msg.data;
}

static void
fail(DeliveryResult *r, bool permanent, const char *fmt, const char *detail)
{
	r->ok = false;
	r->permanent = permanent;
	r->error = psprintf(fmt, detail);
}

void
nocrm_send_mail(DeliveryHandles *h, const char *to, const char *message, DeliveryResult *r)
{
	CURL	   *c;
	struct curl_slist *rcpt = NULL;
	UploadBuffer buf = {message, strlen(message), 0};
	char		errbuf[CURL_ERROR_SIZE] = "";
	CURLcode	res;
	long		code = 0;

	memset(r, 0, sizeof(*r));
	/* A bad address is final whatever the server settings; check it first. */
	if (!nocrm_valid_address(to))
	{
		fail(r, true, "invalid recipient address \"%s\"", to);
		return;
	}
	if (nocrm_smtp_url == NULL || nocrm_smtp_url[0] == '\0')
	{
		fail(r, false, "%s", "nocrm.smtp_url is not set");
		return;
	}
	if (!nocrm_valid_address(nocrm_mail_from))
	{
		fail(r, false, "%s", "nocrm.mail_from is not a valid address");
		return;
	}

	c = handle(&h->smtp);
	rcpt = curl_slist_append(rcpt, psprintf("<%s>", to));
	curl_easy_setopt(c, CURLOPT_URL, nocrm_smtp_url);
	curl_easy_setopt(c, CURLOPT_MAIL_FROM, psprintf("<%s>", nocrm_mail_from));
	curl_easy_setopt(c, CURLOPT_MAIL_RCPT, rcpt);
	curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(c, CURLOPT_READFUNCTION, read_upload);
	curl_easy_setopt(c, CURLOPT_READDATA, &buf);
	curl_easy_setopt(c, CURLOPT_INFILESIZE, (long) buf.len);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long) nocrm_connect_timeout_ms);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long) nocrm_request_timeout_ms);
	curl_easy_setopt(c, CURLOPT_USE_SSL,
					 nocrm_smtp_tls == SMTP_TLS_REQUIRE ? (long) CURLUSESSL_ALL :
					 nocrm_smtp_tls == SMTP_TLS_TRY ? (long) CURLUSESSL_TRY : (long) CURLUSESSL_NONE);
	if (nocrm_smtp_user && nocrm_smtp_user[0])
	{
		curl_easy_setopt(c, CURLOPT_USERNAME, nocrm_smtp_user);
		curl_easy_setopt(c, CURLOPT_PASSWORD, nocrm_smtp_password ? nocrm_smtp_password : "");
	}

	res = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_slist_free_all(rcpt);
	CHECK_FOR_INTERRUPTS();

	r->status = code;
	if (res == CURLE_OK)
	{
		r->ok = true;
		return;
	}
	/*
	 * SMTP 5xx about this message is final; 4xx, network trouble and a
	 * refused login (530/535: our settings, not the message) are retried.
	 */
	r->ok = false;
	r->permanent = code >= 500 && code < 600 && code != 530 && code != 535 &&
		res != CURLE_LOGIN_DENIED;
	r->error = psprintf("SMTP %s%s%s (response %ld)", curl_easy_strerror(res),
						errbuf[0] ? ": " : "", errbuf, code);
}

/*
 * POSTs a JSON body.  signature_secret, when set, adds X-Nocrm-Signature:
 * sha256=<hex HMAC of the body>.
 */
void
nocrm_post_json(DeliveryHandles *h, const char *url, const char *body,
				const char *idempotency_key, const char *event,
				const char *signature_secret, DeliveryResult *r)
{
	CURL	   *c;
	struct curl_slist *headers = NULL;
	char		errbuf[CURL_ERROR_SIZE] = "";
	StringInfoData answer;
	CURLcode	res;
	long		code = 0;

	memset(r, 0, sizeof(*r));
	if (url == NULL || url[0] == '\0')
	{
		fail(r, false, "%s", "no URL to send to (is nocrm.push_url set?)");
		return;
	}
	if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
	{
		fail(r, true, "not an http(s) URL: %s", url);
		return;
	}

	c = handle(&h->http);
	initStringInfo(&answer);
	headers = curl_slist_append(headers, "Content-Type: application/json; charset=utf-8");
	headers = curl_slist_append(headers, psprintf("Idempotency-Key: %s", idempotency_key));
	if (event)
		headers = curl_slist_append(headers, psprintf("X-Nocrm-Event: %s", event));
	if (signature_secret && signature_secret[0])
		headers = curl_slist_append(headers,
									psprintf("X-Nocrm-Signature: sha256=%s",
											 nocrm_hmac_sha256_hex(signature_secret, body)));
	headers = curl_slist_append(headers, "Expect:");
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_POST, 1L);
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long) strlen(body));
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(c, CURLOPT_USERAGENT, "nocrm_automation/1.0");
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &answer);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long) nocrm_connect_timeout_ms);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long) nocrm_request_timeout_ms);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");

	res = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_slist_free_all(headers);
	CHECK_FOR_INTERRUPTS();

	r->status = code;
	if (res != CURLE_OK)
	{
		r->ok = false;
		r->permanent = false;
		r->error = psprintf("HTTP %s%s%s", curl_easy_strerror(res), errbuf[0] ? ": " : "", errbuf);
		return;
	}
	r->ok = code >= 200 && code < 300;
	if (!r->ok)
	{
		/* 4xx but 429 is the receiver refusing this request for good. */
		r->permanent = code >= 300 && code < 500 && code != 429;
		r->error = psprintf("HTTP %ld: %s", code, answer.data);
	}
}

char *
nocrm_hmac_sha256_hex(const char *key, const char *data)
{
	pg_hmac_ctx *ctx = pg_hmac_create(PG_SHA256);
	uint8		digest[PG_SHA256_DIGEST_LENGTH];
	char	   *hex = palloc(PG_SHA256_DIGEST_LENGTH * 2 + 1);

	if (ctx == NULL ||
		pg_hmac_init(ctx, (const uint8 *) key, strlen(key)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) data, strlen(data)) < 0 ||
		pg_hmac_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "HMAC-SHA256 failed");
	pg_hmac_free(ctx);
	for (int i = 0; i < PG_SHA256_DIGEST_LENGTH; i++)
		sprintf(hex + i * 2, "%02x", digest[i]);
	return hex;
}
